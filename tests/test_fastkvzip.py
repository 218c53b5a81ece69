"""FastKVzip: its gate on hand-set weights, its kept sets on hand-made scores, its training routine, real runs."""

import math

import pytest
import torch

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.fastkvzip import Gate, Gates, fit_gate, train_gates
from kvsqueeze.ragged import RaggedLayer
from conftest import cached, random_ids, tiny_model


def test_the_gate_is_the_tokens_probability_against_its_sink_keys():
    gate = Gate(hidden_size=2, kv_heads=1, group=1, dim=2, sinks=2)
    with torch.no_grad():
        gate.q_proj.weight.copy_(torch.eye(2)), gate.q_proj.bias.zero_(), gate.k_proj.weight.copy_(torch.eye(2))
        gate.sink_keys.copy_(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
        gate.bias.fill_(0.5)
        score = gate(torch.tensor([[[3.0, 0.0]]]))
    # RMS-normed, query and key are [sqrt 2, 0]: own logit 2 / sqrt 2 + 0.5, sink logits 0 and sqrt 2 / sqrt 2
    own = math.exp(math.sqrt(2) + 0.5)
    assert score.shape == (1, 1, 1)
    assert score.item() == pytest.approx(own / (own + math.exp(0) + math.exp(1)), rel=1e-5)


def test_the_gate_averages_the_probabilities_of_the_group():
    gate = Gate(hidden_size=8, kv_heads=2, group=3, dim=4, sinks=5)
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        both = gate(x)
        gate.bias[:, 1:] = float("-inf")  # the group's other queries give probability 0
        first = gate(x)
    assert both.shape == (2, 2, 7) and ((both > 0) & (both < 1)).all()
    assert torch.all(first < both)  # the average of three is now a third of the first query's probability


class TableGates(Gates):
    """Gates of the tiny Llama's shape that give hand-made scores [layers, kv_heads, tokens], whatever the input."""

    def __init__(self, table):
        super().__init__(4, 64, 2, 2)
        self.table = table

    def forward(self, layer, hidden_states):
        return self.table[layer][None]


def hand_table() -> torch.Tensor:
    """12 tokens: sinks 0-1 and window 9-11 score nothing; the middle scores 0.01 x position + 0.001 x head, with
    eight tokens far above."""
    table = (0.01 * torch.arange(12.0) + 0.001 * torch.arange(2.0)[:, None]).repeat(4, 1, 1)
    table[..., :2] = table[..., 9:] = 0.0
    for (layer, head, position), score in {(0, 0, 5): 0.9, (0, 0, 6): 0.8, (1, 1, 3): 0.7, (2, 0, 4): 0.6,
                                           (2, 1, 4): 0.55, (3, 0, 2): 0.5, (3, 0, 8): 0.45, (3, 1, 7): 0.4}.items():
        table[layer, head, position] = score
    return table


def kept_positions(ctx, full, row: int = 0) -> list[list[list[int]]]:
    """[layer][head] -> the positions kept in batch row `row`, found by matching the kept keys to the full cache's."""
    out = []
    for layer, whole in zip(ctx.cache.layers, full.cache.layers):
        keys, _, real = layer.dense_view() if isinstance(layer, RaggedLayer) else (layer.keys, None, None)
        heads = []
        for h in range(keys.shape[1]):
            kept = keys[row, h] if real is None else keys[row, h][real[row, h]]
            heads.append(sorted(torch.cdist(kept, whole.keys[0, h]).argmin(-1).tolist()))
        out.append(heads)
    return out


PROTECTED = [0, 1, 9, 10, 11]  # n_sink 2, window 12 x 0.25
EXPECTED = {  # (layer, head) -> the middle positions kept
    "pair": {(0, 0): [5, 6], (1, 1): [3], (2, 0): [4], (2, 1): [4], (3, 0): [2, 8], (3, 1): [7]},  # the 8 best of all
    "layer": {(0, 0): [5, 6], (1, 1): [3, 8], (2, 0): [4], (2, 1): [4], (3, 0): [2, 8]},  # each layer's 2 best
    "head": {(0, 0): [5], (0, 1): [8], (1, 0): [8], (1, 1): [3], (2, 0): [4], (2, 1): [4], (3, 0): [2], (3, 1): [7]},
}


@pytest.mark.parametrize("level", ["pair", "layer", "head"])
def test_keeps_the_sinks_the_window_and_the_best_gate_scores_at_its_level(level):
    model, ids = tiny_model(), random_ids(12)
    method = kvsqueeze.FastKVzip(ratio=0.5, gates=TableGates(hand_table()), level=level, n_sink=2, window_ratio=0.25)
    ctx = kvsqueeze.compress(model, None, ids, method)
    kept = kept_positions(ctx, kvsqueeze.compress(model, None, ids))
    for layer in range(4):
        for head in range(2):
            expected = sorted(PROTECTED + EXPECTED[level].get((layer, head), []))
            assert kept[layer][head] == expected, (layer, head)
    assert ctx.stats.compression_ratio == 0.5


def test_the_window_is_two_percent_of_the_context_then_window_size():
    method = kvsqueeze.FastKVzip(gates=TableGates(hand_table()))
    assert [method.window(n) for n in (49, 50, 1000, 31999, 32000, 100000)] == [0, 1, 20, 639, 4096, 4096]


def test_ratio_zero_reproduces_the_model_exactly(family):
    model = tiny_model(family)
    context, question = random_ids(60, seed=1), random_ids(5, seed=2)
    method = kvsqueeze.FastKVzip(ratio=0.0, gates=Gates.for_model(model))
    with torch.no_grad(), kvsqueeze.attached(model):
        expected = model(question, **cached(kvsqueeze.compress(model, None, context).cache.fork())).logits
        logits = model(question, **cached(kvsqueeze.compress(model, None, context, method).cache.fork())).logits
    assert torch.equal(logits, expected)


def test_half_the_cache_is_really_freed_on_every_family(family):
    model = tiny_model(family)
    ctx = kvsqueeze.compress(model, None, random_ids(120, seed=3), kvsqueeze.FastKVzip(ratio=0.5,
                                                                                      gates=Gates.for_model(model)))
    layers = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    kept = [layer.kept_per_head()[0] for layer in layers]
    assert sum(int(k.sum()) for k in kept) == 60 * sum(k.numel() for k in kept)  # the budget over all layers
    assert len({int(h) for k in kept for h in k}) > 1  # heads keep different numbers of tokens
    assert sum(layer.nbytes() for layer in layers) <= 0.5 * 1.25 * sum(layer.peak_bytes for layer in layers)
    assert all(layer.get_seq_length() == 120 for layer in layers)
    with torch.no_grad(), kvsqueeze.attached(model):
        assert torch.isfinite(model(random_ids(5, seed=4), **cached(ctx.cache.fork())).logits).all()


def test_budget_in_tokens():
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(100), kvsqueeze.FastKVzip(budget=40, gates=Gates.for_model(model)))
    assert sum(int(layer.kept_per_head().sum()) for layer in ctx.cache.layers) == 40 * 4 * 2


@pytest.mark.parametrize("quantizer", [None, "kivi-4"])
def test_a_batch_keeps_what_each_context_keeps_alone(quantizer):
    """Left padding; with a quantizer, layers are stored packed (padding dropped) before the last layer chooses."""
    model = tiny_model()
    method = kvsqueeze.FastKVzip(ratio=0.5, gates=Gates.for_model(model))
    rows = [random_ids(400, seed=5), random_ids(250, seed=6)]
    batch = kvsqueeze.compress(model, None, rows, method, quantizer=quantizer)
    for b, row in enumerate(rows):
        full, alone = kvsqueeze.compress(model, None, row), kvsqueeze.compress(model, None, row, method)
        assert kept_positions(batch, full, b) == kept_positions(alone, full)


def test_one_prefill_for_several_methods_gives_the_same_cache():
    model, ids = tiny_model(), random_ids(90)
    method = kvsqueeze.FastKVzip(ratio=0.6, gates=Gates.for_model(model))
    shared, _ = kvsqueeze.compress_each(model, None, ids, [method, kvsqueeze.SnapKV(ratio=0.5)])
    alone = kvsqueeze.compress(model, None, ids, method)
    for a, b in zip(shared.cache.layers, alone.cache.layers):
        assert torch.equal(a.dense_view()[0], b.dense_view()[0])


def test_fit_gate_lowers_the_cross_entropy():
    torch.manual_seed(0)
    teacher, student = Gate(16, 2, 2, dim=4, sinks=3), Gate(16, 2, 2, dim=4, sinks=3)
    x = torch.randn(500, 16)
    with torch.no_grad():
        y = teacher(x[None])[0].T

    def loss():
        with torch.no_grad():
            return torch.nn.functional.binary_cross_entropy(student(x[None])[0].T, y).item()

    before = loss()
    fit_gate(student, x, y, steps=200, batch_size=100, lr=0.2, momentum=0.9, seed=0)
    assert loss() < before - 0.01


def test_says_how_to_get_gates(tmp_path):
    with pytest.raises(ValueError, match="train_gates"):
        kvsqueeze.FastKVzip(ratio=0.5)
    with pytest.raises(FileNotFoundError, match="train_gates"):
        kvsqueeze.compress(tiny_model(), None, random_ids(20), kvsqueeze.FastKVzip(gates=tmp_path / "none.safetensors"))
    other = tmp_path / "other.safetensors"
    Gates(2, 64, 2, 2).save(other)
    with pytest.raises(ValueError, match="not this model"):
        kvsqueeze.compress(tiny_model(), None, random_ids(20), kvsqueeze.FastKVzip(gates=other))
    surrogate = tmp_path / "kvzap.safetensors"
    kvsqueeze.methods.kvzap.Surrogate(4, 64, 2).save(surrogate)
    with pytest.raises(ValueError, match="not a FastKVzip gate file"):
        kvsqueeze.compress(tiny_model(), None, random_ids(20), kvsqueeze.FastKVzip(gates=surrogate))
    with pytest.raises(ValueError, match="level"):
        kvsqueeze.FastKVzip(gates=other, level="token")


def test_refuses_chunks_and_says_so():
    model = tiny_model()
    with pytest.raises(ValueError, match="chunk_size"):
        kvsqueeze.compress(model, None, random_ids(50), kvsqueeze.FastKVzip(gates=Gates.for_model(model)), chunk_size=16)


def test_gates_train_on_the_bundled_model_round_trip_and_answer(bundled, tmp_path):
    model, tokenizer = bundled
    path = tmp_path / "fastkvzip.safetensors"
    gates = train_gates(model, tokenizer, samples=2, tokens=150, steps=20, batch_size=64, out=path, progress=False)
    loaded = Gates.load(path)
    x = torch.randn(1, 5, 576)
    assert loaded.shape == (30, 576, 3, 3) and (loaded.dim, loaded.sinks) == (16, 16)
    assert torch.equal(gates(4, x), loaded(4, x))
    assert not torch.equal(loaded(4, x), Gates.for_model(model)(4, x))  # trained
    sample = needle_sample(tokenizer, 300, 0.5, seed=7)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.FastKVzip(ratio=0.5, gates=str(path)))
    assert ctx.method.settings() == {"ratio": 0.5, "gates": str(path), "level": "pair", "n_sink": 4,
                                     "window_ratio": 0.02, "window_size": 4096}
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert ctx.stats.bytes_held <= 0.56 * ctx.stats.bytes_uncompressed
    assert sample.correct(ctx.ask(sample.question, max_new_tokens=24))
