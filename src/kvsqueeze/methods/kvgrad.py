from contextlib import contextmanager

import torch

from ..models import attention_modules, frozen
from .kvzip import KVzip, observe, repeat_inputs, rows, sink_length
from .reconstruction import Reconstruction


@contextmanager
def differentiable(model):
    """Activations carry gradients while the weights stay frozen: the embeddings are made to require grad and the
    parameters stop requiring it (restored on exit; nothing is accumulated in any parameter's .grad)."""
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.detach().requires_grad_())
    try:
        with frozen(model), torch.enable_grad():
            yield
    finally:
        hook.remove()


def residual_norm(decoder_layer):
    """The norm whose input is the pre-MLP residual stream (attention output already added), or None."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):  # Gemma-style first: post-attention is
        if hasattr(decoder_layer, name):  # there a norm of the attention output, before the residual add
            return getattr(decoder_layer, name)
    return None


@contextmanager
def captured_residuals(model):
    """{"residual": {layer: pre-MLP residual stream}, "last": output of the last decoder layer} of the next forward.

    Where a decoder layer has no recognised norm before its MLP, the attention output stands in for the
    residual (the same gradient in pre-norm models: the residual is the layer input plus that output)."""
    captured = {"residual": {}, "last": None}

    def keep(layer_idx, tensor):
        captured["residual"][layer_idx] = tensor[0] if isinstance(tensor, tuple) else tensor

    def on_last(module, args, output):
        captured["last"] = output[0] if isinstance(output, tuple) else output

    handles = [model.base_model.layers[-1].register_forward_hook(on_last)]
    for decoder_layer, attention in zip(model.base_model.layers, attention_modules(model)):
        norm, i = residual_norm(decoder_layer), attention.layer_idx
        if norm is not None:
            handles.append(norm.register_forward_pre_hook(lambda module, args, i=i: keep(i, args[0])))
        else:
            handles.append(attention.register_forward_hook(lambda module, args, out, i=i: keep(i, out)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class KVgrad(KVzip):
    """Keeps the KV pairs whose contribution, while the model repeats the context, most moves its final hidden states.

    "KVgrad" (https://openreview.net/forum?id=cg1wTCJjjk; NVIDIA kvpress's KVgradPress), on top of KVzip's
    context reconstruction (Kim et al., arXiv:2505.23416): after the prefill the model repeats the context
    chunk by chunk on the full cache, and a KV pair c of layer l scores max over reconstruction tokens p (and the
    query heads of its group) of A_pc * ||W_o v_c|| * ||d Phi / d a_p||, input x gradient attribution of the pair to
    Phi = sum_p ||h_p||^2 over the last decoder layer's outputs. A is KVzip's attention (softmax over sinks,
    chunk and repeated tokens); a_p is the pre-MLP residual stream of layer l (the input of its norm before
    the MLP). Selection is KVzip's: `level="pair"`
    over all layers and heads by default. kvpress's chunks of 512 tokens.

    Inherent cost: per chunk, one forward with gradients and one backward (to the activations only: the weights are
    frozen and untouched) over the chunk on the full cache, i.e. KVzip's reconstruction forward plus its backward,
    about twice that forward: 5.5x a plain prefill in all, measured on the bundled 135M model at 2,048 tokens. The
    scores come from that forward's own attention (`reconstruction`, differentiable as merged parts) and the
    gradients it already needs: within 1.05x of it, measured.
    """

    name = "kvgrad"
    extra_work = ("second_forward", "backward")

    chunk_size: int = 512

    def importance(self, model, cache, ids, attention_mask=None, prompt=None) -> dict[int, torch.Tensor]:
        scores: dict[int, torch.Tensor] = {}
        for b, fork, real_ids, mask in rows(cache, ids, attention_mask):
            sink = sink_length(prompt, real_ids, self.n_sink)
            for start, end, repeat in repeat_inputs(prompt, real_ids, sink, self.chunk_size, overlap=8):
                contexts, attention = [], Reconstruction(sink, start, end)
                with differentiable(model), captured_residuals(model) as captured:
                    observe(model, fork, repeat, contexts.append, mask, start=len(real_ids), attention=attention)
                    objective = captured["last"].float().pow(2).sum()
                    layers = [ctx.layer_idx for ctx in contexts]
                    grads = torch.autograd.grad(objective, [captured["residual"][i] for i in layers])
                with torch.no_grad():
                    for ctx, grad in zip(contexts, grads):
                        self.score_chunk(scores, ctx, b, ids.shape[0], sink, start, end, grad.float().norm(dim=-1),
                                         value_norms=True, attention=attention)
        return scores
