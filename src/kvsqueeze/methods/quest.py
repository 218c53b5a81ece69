from weakref import WeakKeyDictionary

import torch

from .. import attention
from ..cache import compressible_layers
from ..context import LayerContext
from .base import Method


def page_bounds(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound on q.k over each page: sum_i max(q_i * min_i, q_i * max_i).

    query [..., dim], low/high [..., pages, dim] (the page's element-wise min and max keys) -> [..., pages].
    """
    query = query.float()[..., None, :]
    return torch.maximum(query * low.float(), query * high.float()).sum(-1)


class Quest(Method):
    """Keeps the whole cache; at each decoding step attention reads only the pages whose keys can score highest.

    Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
    arXiv:2406.10774. Stored keys are grouped in pages of `page_size` tokens (16 in the paper); each page
    keeps the element-wise min and max of its keys. At a decoding step, a page's upper bound on q.k is
    sum_i max(q_i min_i, q_i max_i); the page holding the newest token is always read and the best
    `budget // page_size - 1` others by that bound (Quest's kernels: the page budget includes the last
    page). The first `dense_layers` layers attend densely (the paper leaves the first two out).
    The prefill (and the question's forward) is dense; nothing is evicted.

    `budget`: tokens read per head (at least two pages), 1024 by default (the authors' LongBench and
    passkey runs use 512 to 4096, on 32k to 100k contexts); a float below 1 is a fraction of the stored
    tokens instead, for short contexts. With GQA,
    a KV head reads the pages its query heads' bounds rank best (the largest bound over the group); the
    paper's models are multi-head, where this is its rule exactly.

    After a generation, `stats()` gives what was measured: the bytes held (cache plus page metadata) and
    the bytes attention read per decoding step (selected pages plus the metadata scored), against a
    dense read. Use it while generating: `ctx.ask(question, decode_method=Quest())`.
    """

    name = "quest"
    phase = "decode"
    declares = frozenset({"attention"})

    budget: int | float = 1024
    page_size: int = 16
    dense_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0 or self.page_size < 1 or self.dense_layers < 0:
            raise ValueError(f"Quest needs budget > 0, page_size >= 1, dense_layers >= 0; got {self.budget}, "
                             f"{self.page_size}, {self.dense_layers}")
        # per cache layer: (min, max) keys of its complete pages [batch, kv_heads, pages, dim]; freed with the layer
        self.metadata: WeakKeyDictionary = WeakKeyDictionary()
        self.selected: dict[int, torch.Tensor] = {}  # per layer, the token positions read at the last step
        self._reset()

    def _reset(self) -> None:
        self.steps: list[dict] = []  # one per decoding step: bytes read, dense read, held
        self._read = self._dense_read = 0

    def setup(self, model: torch.nn.Module) -> None:
        self._last_layer = compressible_layers(model.config)[-1]
        self._reset()

    def pages_read(self, stored: int) -> int:
        """Pages each head reads (the newest one included) when the layer stores `stored` tokens."""
        tokens = self.budget * stored if self.budget < 1 else self.budget
        return max(2, int(tokens) // self.page_size)

    def page_metadata(self, layer, key: torch.Tensor, complete: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max keys of the layer's first `complete` pages, computed once per page and kept."""
        low, high = self.metadata.get(layer, (key[:, :, :0], key[:, :, :0]))
        done = low.shape[2]
        if done > complete or low.shape[:2] != key.shape[:2]:  # the layer was cut or reordered: start over
            low, high, done = key[:, :, :0], key[:, :, :0], 0
        if done < complete:
            pages = key[:, :, done * self.page_size: complete * self.page_size].unflatten(2, (-1, self.page_size))
            low, high = torch.cat([low, pages.amin(3)], 2), torch.cat([high, pages.amax(3)], 2)
            self.metadata[layer] = (low, high)
        return low, high

    def attend(self, layer, call):
        module, query, key, value = call.module, call.query, call.key, call.value
        stored, dense = key.shape[-2], key.nbytes + value.nbytes
        if query.shape[-2] != 1:
            return None  # prefill and the question: dense
        self._dense_read += dense
        current = (stored - 1) // self.page_size  # the page of the newest token; the pages before it are complete
        pages = self.pages_read(stored)
        if module.layer_idx < self.dense_layers or current < pages:
            self._read += dense
            self.selected.pop(module.layer_idx, None)
            return None
        low, high = self.page_metadata(layer, key, current)
        batch, kv_heads = key.shape[:2]
        queries = query[:, :, 0].unflatten(1, (kv_heads, -1))  # [batch, kv_heads, group, dim]
        bounds = page_bounds(queries, low[:, :, None], high[:, :, None]).amax(2)  # [batch, kv_heads, pages]
        chosen = bounds.topk(pages - 1, dim=-1).indices.sort(-1).values
        slots = torch.arange(self.page_size, device=key.device)
        newest = torch.arange(current * self.page_size, stored, device=key.device).expand(batch, kv_heads, -1)
        index = torch.cat([(chosen[..., None] * self.page_size + slots).flatten(-2), newest], dim=-1)
        self.selected[module.layer_idx] = index
        self._read += (low.nbytes + high.nbytes + index.numel() * (key.shape[-1] * key.element_size()
                                                                    + value.shape[-1] * value.element_size()))
        return attention.attend_to(call, index)

    def compress(self, ctx: LayerContext) -> None:
        if ctx.layer_idx == self._last_layer:  # the step is over: record what it read and what is held
            metadata = self.metadata_bytes(ctx.cache)
            self.steps.append({"bytes_read": self._read, "bytes_dense_read": self._dense_read,
                               "bytes_metadata": metadata, "bytes_held": ctx.cache.nbytes() + metadata})
            self._read = self._dense_read = 0

    def metadata_bytes(self, cache) -> int:
        """Bytes of page metadata held for the layers of `cache`."""
        return sum(sum(t.nbytes for t in self.metadata[layer]) for layer in cache.layers if layer in self.metadata)

    def stats(self) -> dict:
        """Measured over the decoding steps of the last generation: bytes held at the last step (the cache and the
        page metadata), and bytes of keys, values and metadata attention read per step, mean, with a dense read's."""
        if not self.steps:
            return {"steps": 0}
        last = self.steps[-1]
        read = sum(s["bytes_read"] for s in self.steps) / len(self.steps)
        dense = sum(s["bytes_dense_read"] for s in self.steps) / len(self.steps)
        return {"steps": len(self.steps), "bytes_held": last["bytes_held"], "bytes_metadata": last["bytes_metadata"],
                "bytes_read_per_step": read, "bytes_dense_read_per_step": dense,
                "read_fraction": read / dense if dense else 1.0}
