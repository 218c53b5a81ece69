"""Recent kvpress methods: EntropyGatedChunkKV, Cap, KVgrad, LU-KV: kept sets on hand-made cases, tiny models, bundled model."""

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.cap import capacity_scores
from kvsqueeze.methods.entropy_gated_chunkkv import gated_chunk_selection, normalized_entropy
from conftest import cached, random_ids, tiny_model


def kept_rows(ctx):
    return [layer.kept_per_head() for layer in ctx.cache.layers]


# EntropyGatedChunkKV

SPIKY = torch.tensor([10.0, 0.2, 0.1, 0.0,  # mean 2.6, carried by one token: spiky
                      3.0, 3.0, 3.0, 3.0,  # best mean, flat
                      1.0, 1.0, 1.0, 1.0,
                      0.5, 0.4, 0.6, 0.5])


def positions(mask):
    return mask.nonzero().flatten().tolist()


def test_entropy_is_normalized_per_chunk():
    chunks = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [2.0, 2.0, float("nan"), float("nan")],
                           [-1.0, 1.0, float("nan"), float("nan")], [3.0] + [float("nan")] * 3])
    entropy = normalized_entropy(chunks, torch.tensor([4, 4, 2, 2, 1]))
    assert entropy.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0, 0.0], abs=1e-5)


def test_a_spiky_important_chunk_keeps_only_its_best_tokens():
    # chunks by mean: 1 (flat, whole), 0 (spiky: its best token only), 2 (whole) -> 9 tokens
    assert positions(gated_chunk_selection(SPIKY, 4, 1, 9)) == [0, 4, 5, 6, 7, 8, 9, 10, 11]
    # the next chunk gives its best token to the 10th slot
    assert positions(gated_chunk_selection(SPIKY, 4, 1, 10)) == [0, 4, 5, 6, 7, 8, 9, 10, 11, 14]
    # ChunkKV would keep chunk 0 whole: here its other tokens only come back as a final top-up
    assert positions(gated_chunk_selection(SPIKY, 4, 1, 15)) == [0, 1, 2] + list(range(4, 16))
    assert positions(gated_chunk_selection(SPIKY, 4, 2, 6)) == [0, 1, 4, 5, 6, 7]


def test_a_trailing_partial_chunk_is_a_chunk():
    scores = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0])
    assert positions(gated_chunk_selection(scores, 3, 1, 2)) == [3, 4]


class RecordingGate(kvsqueeze.EntropyGatedChunkKV):
    name = ""  # not registered

    def keep_mask(self, ctx):
        mask = super().keep_mask(ctx)
        self.masks.append(mask)
        return mask


def test_entropy_gated_chunkkv_keeps_the_same_tokens_in_every_head(family):
    model = tiny_model(family)
    method = RecordingGate(ratio=0.6, chunk_length=5, low_entropy_chunk_length=2)
    method.masks = []
    ctx = kvsqueeze.compress(model, None, random_ids(100), method)
    assert method.masks
    for mask in method.masks:
        assert mask.sum(-1).tolist() == [[40, 40]] and torch.equal(mask[:, 0], mask[:, 1])
    for layer in ctx.cache.layers:
        if isinstance(layer, kvsqueeze.EvictingLayer):
            assert layer.kept_per_head().tolist() == [[40, 40]]


def test_entropy_gated_chunkkv_settings():
    method = kvsqueeze.EntropyGatedChunkKV(budget=64, scorer="knorm")
    assert method.settings() == {"budget": 64, "scorer": "KNorm(ratio=0.5)", "chunk_length": 10, "low_entropy_chunk_length": 4}
    with pytest.raises(ValueError, match="low_entropy_chunk_length"):
        kvsqueeze.EntropyGatedChunkKV(chunk_length=4, low_entropy_chunk_length=4)


# Cap

def test_capacity_scores_favour_values_no_other_token_repeats():
    values = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])[None, None]
    keys = torch.ones(1, 1, 3, 2)
    counted = torch.ones(1, 1, 3, dtype=torch.bool)
    scores = capacity_scores(torch.ones(1, 1, 2), keys, values, counted, tau=0.0, epsilon=0.0)
    # A = I + 2 e1 e1' + e2 e2' = diag(3, 2): leverage 1/3, 1/3, 1/2
    assert scores[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 2])


def test_capacity_scores_favour_keys_aligned_with_past_queries():
    values = torch.eye(3)[None, None]
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])[None, None]
    counted = torch.ones(1, 1, 3, dtype=torch.bool)
    scores = capacity_scores(torch.tensor([[[2.0, 0.0, 0.0]]]), keys, values, counted, tau=5.0, epsilon=0.0)[0, 0]
    assert scores[0] > scores[1] > scores[2]
    # tokens left out of the capacity matrix (sinks, padding) score 0
    counted[..., 0] = False
    assert capacity_scores(torch.tensor([[[2.0, 0.0, 0.0]]]), keys, values, counted, 5.0, 0.0)[0, 0, 0] == 0


def test_cap_always_keeps_the_sinks(family):
    model = tiny_model(family)
    ctx = kvsqueeze.compress(model, None, random_ids(80), kvsqueeze.Cap(budget=12, n_sink=4))
    for layer in ctx.cache.layers:
        if isinstance(layer, kvsqueeze.EvictingLayer):
            assert layer.kept_per_head().tolist() == [[12, 12]]


def test_cap_settings():
    assert kvsqueeze.Cap(ratio=0.3).settings() == {"ratio": 0.3, "tau": 5.0, "n_future_positions": 512, "n_sink": 4,
                                                   "epsilon": 1e-6}


# On the bundled model

@pytest.mark.parametrize("method", [kvsqueeze.EntropyGatedChunkKV(ratio=0.5), kvsqueeze.Cap(ratio=0.5),
                                    kvsqueeze.KVgrad(ratio=0.5)],
                         ids=lambda m: m.name)
def test_bundled_end_to_end(bundled, method):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 300, 0.5, seed=5)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, method)
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert ctx.stats.bytes_held <= 0.55 * ctx.stats.bytes_uncompressed  # ragged layers (KVgrad) hold pages
    answer = ctx.ask(sample.question, max_new_tokens=16)
    assert isinstance(answer, str) and answer.strip()


# KVgrad

def reference_kvgrad(model, context, n_sink):
    """A x ||W_o v|| x ||grad of sum ||h_last||^2 wrt the pre-MLP residual||, max over repeat queries and the
    group, from the plain model (eager attention weights, autograd): the context repeated after itself."""
    model.set_attn_implementation("eager")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **cached(cache))
    residuals, last = {}, {}
    layers = model.model.layers
    handles = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args, i=i: residuals.__setitem__(i, args[0])) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda m, args, out: last.__setitem__(0, out)))
    repeat = context[:, n_sink:]
    embeds = model.get_input_embeddings()(repeat).detach().requires_grad_()
    out = model.model(inputs_embeds=embeds, **cached(cache), output_attentions=True)
    grads = torch.autograd.grad(last[0].pow(2).sum(), [residuals[i] for i in range(len(layers))])
    for h in handles:
        h.remove()
    model.set_attn_implementation("sdpa")
    n, config = context.shape[1], model.config
    group = config.num_attention_heads // config.num_key_value_heads
    scores = []
    with torch.no_grad():
        for i, (weights, grad) in enumerate(zip(out.attentions, grads)):
            o_proj = layers[i].self_attn.o_proj.weight.view(config.hidden_size, config.num_attention_heads, -1)
            values = cache.layers[i].values[:, :, n_sink:n].repeat_interleave(group, 1)
            norms = torch.einsum("bhnd,ehd->bhne", values, o_proj).norm(dim=-1)
            attributed = weights[..., n_sink:n] * grad.norm(dim=-1)[:, None, :, None] * norms[:, :, None]
            scores.append(attributed.amax(2).view(1, config.num_key_value_heads, group, -1).amax(2))
    return scores


def test_kvgrad_scores_are_input_times_gradient_attribution():
    model = tiny_model("llama")
    context = random_ids(40, seed=7)
    method = kvsqueeze.KVgrad(ratio=0.5, chunk_size=100, n_sink=4)  # one chunk: KVzip's softmax is the full one
    weights = [p.clone() for p in model.parameters()]
    cache = kvsqueeze.compress(model, None, context, None).cache
    scores = method.importance(model, cache, context)
    expected = reference_kvgrad(model, context, 4)
    for i, reference in enumerate(expected):
        assert torch.isinf(scores[i][..., :4]).all()
        torch.testing.assert_close(scores[i][..., 4:], reference, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, w) and p.grad is None and p.requires_grad for p, w in zip(model.parameters(), weights))


def test_kvgrad_chooses_over_all_layers_and_heads():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(60), kvsqueeze.KVgrad(budget=20, chunk_size=16))
    kept = torch.cat([layer.kept_per_head().flatten() for layer in ctx.cache.layers])
    assert kept.sum() == 20 * kept.numel() and kept.min() >= 4
    by_head = kvsqueeze.compress(model, None, random_ids(60), kvsqueeze.KVgrad(budget=20, level="head"))
    assert all(layer.kept_per_head().tolist() == [[20, 20]] for layer in by_head.cache.layers)
    assert kvsqueeze.KVgrad(ratio=0.3).settings() == {"ratio": 0.3, "level": "pair", "chunk_size": 512, "n_sink": 4, "plus": False}
