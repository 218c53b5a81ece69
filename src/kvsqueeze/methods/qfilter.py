from pathlib import Path

import torch

from ..context import LayerContext
from .base import ScorerMethod


class QFilter(ScorerMethod):
    """Keeps the tokens whose keys project highest on their head's Q-Filter, the main direction of its queries.

    Godey et al., "Q-Filters: Leveraging Query-Key Geometry for Efficient Key-Value Cache Compression",
    arXiv:2503.02812. Queries of a head are strongly anisotropic: the first right singular vector of the
    query matrix, signed so that queries project positively on it, orders keys by their expected attention
    logit. The filters [layers, kv_heads, head_dim] are computed once per model, offline, on local text by
    `kvsqueeze calibrate qfilter --out FILE` (see `calibration.qfilter_filters`: post-RoPE queries of the
    query heads sharing each KV head, since the authors' filters are applied, in kvpress, to the stored
    post-RoPE keys); `filters` is that file or a tensor. Needs neither queries nor attention weights at
    compression time, and keeps no sinks or window (as kvpress). Prefill; for a budget held while
    generating, wrap it in DecodingBudget.
    """

    name = "qfilter"
    calibration = "qfilter"

    filters: "str | Path | torch.Tensor | None" = None

    def __post_init__(self):
        super().__post_init__()
        if self.filters is None:
            raise ValueError("QFilter needs Q-Filters computed on your model: filters=FILE from "
                             "`kvsqueeze calibrate qfilter --out FILE` (or calibration.qfilter_filters)")
        self.loaded: torch.Tensor | None = None

    def setup(self, model):
        from ..calibration import load_calibration  # calibration runs methods: imported when used

        source = {"filters": self.filters} if isinstance(self.filters, torch.Tensor) else self.filters
        self.loaded = load_calibration(source, "qfilter", model)["filters"].to(model.device)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if self.loaded is None:
            raise RuntimeError("QFilter's filters are not loaded: apply it with method.apply(model) or compress()")
        direction = self.loaded[ctx.layer_idx].to(ctx.keys.device)  # [kv_heads, head_dim]
        return torch.einsum("bhnd,hd->bhn", ctx.keys.float(), direction)
