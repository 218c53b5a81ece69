import torch

from ..context import LayerContext
from .base import ScorerMethod
from .key_rerotation import RerotatingContext
from .snapkv import row_windows, window_attention


class Finch(ScorerMethod):
    """Keeps the tokens the question attends to most (each query's weights normalised by how many keys it sees), plus the question.

    Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models", TACL 2024,
    arXiv:2408.00167. SnapKV-like scores whose observation window is the question: the tokens after the last
    `delimiter_id` in the prefill (kvpress's FinchPress finds it the same way, with a separator token put
    between context and question), or the last `window_size` tokens when no delimiter is given or found.
    Causal masking gives a later query fewer weight per key; as in the paper, each query's attention weights
    are multiplied by the number of keys it attends to before averaging over the window and the query heads
    of a KV head. The question is kept, and the kept keys are re-rotated to consecutive positions
    (`rerotate_keys`, see KeyRerotation), as the paper does. The question must be in the compressed text:
    compress `context + separator + question` (the query-aware protocol), then ask with an empty question.
    """

    name = "finch"

    delimiter_id: int | None = None
    window_size: int = 32
    normalize: bool = True
    rerotate_keys: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1; got {self.window_size}")
        self._windows: torch.Tensor | None = None

    def before_forward(self, kwargs):
        """Finds each row's question: the tokens after the row's last delimiter in this forward."""
        ids = kwargs.get("input_ids")
        self._windows = None
        if ids is None or ids.dim() != 2:
            return
        windows = torch.full((ids.shape[0],), self.window_size, dtype=torch.long)
        if self.delimiter_id is not None:
            found = (ids == self.delimiter_id).cpu()
            after_last = found.flip(-1).long().argmax(-1)  # tokens after the last delimiter
            windows = torch.where(found.any(-1), after_last, windows)
        self._windows = windows

    def windows(self, ctx: LayerContext) -> torch.Tensor:
        """[batch]: each row's window, at most its new real tokens but one and its held tokens but one."""
        found = self._windows is not None and len(self._windows) == ctx.keys.shape[0]
        return row_windows(ctx, self._windows if found else self.window_size)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        windows = self.windows(ctx)
        widest = int(windows.max())
        if widest < 1:
            return torch.ones(ctx.keys.shape[:-1], device=ctx.keys.device)
        seen = None
        if self.normalize:  # a query's weights times the real stored tokens it sees (up to itself)
            real = torch.ones(ctx.keys.shape[:-1], device=ctx.keys.device) if ctx.real is None else ctx.real.float()
            seen = real.cumsum(-1)[..., ctx.n_stored - widest:].repeat_interleave(ctx.group_size, dim=1)
        attention, in_window = window_attention(ctx, windows, seen)
        return ctx.per_kv_head(attention).masked_fill(in_window[:, None, :], float("inf"))

    def compress(self, ctx: LayerContext) -> None:
        super().compress(RerotatingContext.of(ctx) if self.rerotate_keys else ctx)
