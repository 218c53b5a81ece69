from ..context import LayerContext
from ..merged import merge_pair
from .base import Method


class MiniCache(Method):
    """Keeps every token, adjacent deep layers sharing one direction per token (SLERP), each with its own magnitudes.

    Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024,
    arXiv:2405.14366. From the middle compressible layer on, each pair of adjacent layers stores, once for
    both, the SLERP (t = `interpolation`, 0.6 as the paper) of their key directions and of their value
    directions, and each layer its own per-token magnitudes; attention reads each layer's magnitude times
    the shared direction. Tokens whose keys' angular distance between the two layers (arccos of the cosine,
    over pi) is within `retention` * (d_max - d_min) of the largest in their head keep both layers' keys and
    values unmerged: the paper's retention threshold (0.05) over the range of distances, read so that it
    retains the few outlying tokens (1 retains all: nothing merged). Done once after the whole context (no chunks);
    tokens after it (question, answer) are stored in full. No token is evicted: the saving is in bytes.
    Single contexts or unpadded batches; merged layers cannot be saved, compressed further or used in beam search.
    """

    name = "minicache"
    declares = frozenset({"whole_context"})

    start: float = 0.5
    interpolation: float = 0.6
    retention: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if not all(0 <= value <= 1 for value in (self.start, self.interpolation, self.retention)):
            raise ValueError(f"MiniCache needs start, interpolation and retention in [0, 1]; got {self.start}, "
                             f"{self.interpolation}, {self.retention}")

    def partner(self, ctx: LayerContext) -> int | None:
        """The layer merged with this one when this one is the second of a pair, else None."""
        compressible = ctx.cache.compressible
        rank, n = ctx.depth
        first = int(n * self.start)
        if rank <= first or (rank - first) % 2 == 0:
            return None
        return compressible[rank - 1]

    def compress(self, ctx: LayerContext) -> None:
        previous = self.partner(ctx)
        if previous is not None:
            merge_pair(ctx.cache, previous, ctx.layer_idx, self.interpolation, self.retention)
