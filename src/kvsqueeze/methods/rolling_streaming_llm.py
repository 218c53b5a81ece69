import torch

from .. import forward
from ..cache import compressible_layers, layer_types
from ..context import LayerContext, rotate_half
from .base import Method


class RollingStreamingLLM(Method):
    """Keeps `n_sink` sink tokens and a rolling window of recent ones, with positions inside the cache.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
    arXiv:2309.17453, as the paper runs it: whenever the cache reaches `window + interval` tokens it
    drops back to the sinks and the last `window - n_sink` tokens, and the kept keys are re-rotated so
    that positions are those in the cache, not in the text. Memory stays flat and generation can run
    far past the model's trained window. Acts at prefill and at every decoding step.
    """

    name = "rolling_streaming_llm"
    phase = "both"
    declares = frozenset({"changes_prefill"})  # positions follow the cache, not the text: its prefill is not the plain model's

    window: int = 1024
    n_sink: int = 4
    interval: int = 64

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.n_sink < self.window or self.interval <= 0:
            raise ValueError(f"need 0 <= n_sink < window and interval > 0; got {self.n_sink}, {self.window}, "
                             f"{self.interval}")

    def setup(self, model):
        if len(compressible_layers(model.config)) != len(layer_types(model.config)):
            raise ValueError("RollingStreamingLLM needs a model whose layers are all full attention")

    def before_forward(self, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("RollingStreamingLLM does not run on padded batches: generate each row on its own")
        state = forward.current()
        cache = None if state is None else state.cache
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if cache is not None and ids is not None:  # positions follow the cache, not the text
            start = cache.get_seq_length()
            kwargs["position_ids"] = torch.arange(start, start + ids.shape[1], device=ids.device)[None]

    def compress(self, ctx: LayerContext) -> None:
        held = ctx.n_stored
        if held < self.window + self.interval:
            return
        shift = held - self.window  # the recent tokens move this many positions back
        keep = torch.zeros(ctx.keys.shape[:-1], dtype=torch.bool, device=ctx.keys.device)
        keep[..., : self.n_sink] = True
        keep[..., held - (self.window - self.n_sink):] = True
        cos, sin = (t[0].to(ctx.keys.dtype) for t in ctx.rope.at(torch.tensor([shift])))
        keys = ctx.keys
        rotary = cos.shape[-1]
        later = keys[:, :, self.n_sink:, :rotary]
        rotated = later * cos - rotate_half(later) * sin  # rotate by -shift
        keys = torch.cat([keys[:, :, : self.n_sink], torch.cat([rotated, keys[:, :, self.n_sink:, rotary:]], -1)], 2)
        ctx.keep(keep, keys=keys)
        ctx.layer.restart_positions()
