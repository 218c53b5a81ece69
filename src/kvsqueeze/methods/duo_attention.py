from pathlib import Path

import torch

from ..head_scores import load_head_scores
from ..context import LayerContext
from .base import Method


class DuoAttention(Method):
    """Keeps every token in retrieval heads, and only sink + recent tokens in streaming heads.

    Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
    Heads", arXiv:2410.10819. Which heads are retrieval heads comes from gates optimised offline on
    the same model (`kvsqueeze calibrate duo_attention`, or the authors' `full_attention_heads.tsv`):
    the `sparsity` fraction of heads with the lowest gates become streaming heads (or those below
    `threshold`). The authors deploy with 64 sink and 256 recent tokens. Heads keep different numbers
    of tokens, stored ragged.
    """

    name = "duo_attention"
    calibration = "duo_attention"

    head_patterns: "str | Path | torch.Tensor | None" = None
    sparsity: float = 0.5
    threshold: float | None = None
    sink_size: int = 64
    recent_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.head_patterns is None:
            raise ValueError("DuoAttention needs head patterns: head_patterns=FILE from "
                             "`kvsqueeze calibrate duo_attention --out FILE` (or the authors' .tsv)")
        if not 0 <= self.sparsity <= 1:
            raise ValueError(f"sparsity is the fraction of streaming heads, in [0, 1]; got {self.sparsity}")

    def setup(self, model):
        gates = load_head_scores(self.head_patterns, model, "duo_attention")
        if self.threshold is not None:
            self.streaming = gates < self.threshold
        else:
            n_streaming = round(gates.numel() * self.sparsity)
            order = gates.flatten().argsort(stable=True)
            self.streaming = torch.zeros(gates.numel(), dtype=torch.bool)
            self.streaming[order[:n_streaming]] = True
            self.streaming = self.streaming.view_as(gates)

    def compress(self, ctx: LayerContext) -> None:
        streaming = self.streaming[ctx.layer_idx].to(ctx.keys.device)
        long_enough = ctx.held.amin(-1) > self.sink_size + self.recent_size  # [batch]: each row decides alone
        if not bool(streaming.any()) or not bool(long_enough.any()):
            return
        rank = ctx.rank
        window = (rank < self.sink_size) | (rank >= ctx.held[..., None] - self.recent_size)
        keep = (~streaming[None, :, None] | window) & (rank >= 0)
        ctx.keep(keep, rows=long_enough)
