"""CUR, QFilter and ExpectedAttention with collected statistics: hand-made kept sets, the offline calibration routines
on the bundled model (saved files round-trip, bad files give clear errors), the command line, end to end."""

import math

import pytest
import torch
from safetensors.torch import save_file

import kvsqueeze
from kvsqueeze import calibration, compress
from kvsqueeze.cache import EvictingLayer, SqueezeCache
from kvsqueeze.cli import main
from kvsqueeze.context import LayerContext, last_queries_attention
from kvsqueeze.models import attention_modules
from kvsqueeze.methods.base import Method
from conftest import build_method, random_ids, tiny_model
from test_batches import assert_rows_equal_alone

MODEL = tiny_model("llama")  # 4 layers, 4 query heads, 2 KV heads, head_dim 16


def context(keys, values):
    cache = SqueezeCache(layers=[EvictingLayer()])
    cache.layers[0].update(keys, values)
    hidden = torch.zeros(keys.shape[0], keys.shape[2], MODEL.config.hidden_size)
    return LayerContext(module=attention_modules(MODEL)[0], cache=cache, hidden_states=hidden)


def kept(method, keys, values=None):
    """Positions each KV head keeps (keys are unique, so kept keys are matched back to their positions)."""
    ctx = context(keys, torch.ones_like(keys) if values is None else values)
    method.compress(ctx)
    return [sorted(torch.cdist(ctx.keys[0, h], keys[0, h]).argmin(-1).tolist()) for h in range(keys.shape[1])]


def with_norms(vectors, norms):
    """`vectors` [1, heads, n, d] rescaled so that token i has norm norms[i] in every head."""
    return vectors / vectors.norm(dim=-1, keepdim=True) * torch.tensor(norms)[None, None, :, None]


def random_states(n, seed):
    return torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(seed))


# CUR

@pytest.mark.parametrize("leverage_type, expected", [("key", [0, 2, 4]), ("value", [0, 1, 5]),
                                                     ("kv_product", [0, 4, 5]), ("kv_avg", [0, 2, 5])])
def test_cur_keeps_the_sinks_and_the_highest_key_value_leverage(leverage_type, expected):
    # squared key norms [1, 1, 9, 1, 4, 2.25], squared value norms [1, 6.25, 1, 1, 4, 8.41]
    keys = with_norms(random_states(6, 0), [1.0, 1.0, 3.0, 1.0, 2.0, 1.5])
    values = with_norms(random_states(6, 1), [1.0, 2.5, 1.0, 1.0, 2.0, 2.9])
    method = kvsqueeze.CUR(budget=3, n_sink=1, leverage_type=leverage_type, local_window_size=None)
    assert kept(method, keys, values) == [expected] * 2


def test_cur_local_windows_rank_each_token_within_its_window():
    # squared key norms [4, 5, 6 | 1, 1, 2]: shares [.27, .33, .40 | .25, .25, .50]
    keys = with_norms(random_states(6, 2), [math.sqrt(x) for x in (4.0, 5.0, 6.0, 1.0, 1.0, 2.0)])
    local = kvsqueeze.CUR(budget=2, n_sink=0, leverage_type="key", local_window_size=3)
    whole = kvsqueeze.CUR(budget=2, n_sink=0, leverage_type="key", local_window_size=None)
    assert kept(local, keys) == [[2, 5]] * 2
    assert kept(whole, keys) == [[1, 2]] * 2


def test_cur_sinks_are_kept_however_small_and_settings_are_checked():
    keys = with_norms(random_states(8, 3), [0.01, 0.01] + [1.0] * 6)
    assert kept(kvsqueeze.CUR(budget=4, n_sink=2), keys)[0][:2] == [0, 1]
    assert kvsqueeze.CUR(sketch_dimension=20).settings()["sketch_dimension"] == 20
    with pytest.raises(ValueError, match="leverage_type"):
        kvsqueeze.CUR(leverage_type="keys")


def test_cur_with_a_projection_is_seeded():
    keys, values = random_states(40, 4), random_states(40, 5)
    first, second = (kept(kvsqueeze.CUR(ratio=0.5, sketch_dimension=8, seed=1), keys, values) for _ in range(2))
    assert first == second


@pytest.mark.parametrize("name", ["cur", "qfilter"])
def test_chunked_batches_equal_chunking_each_row_alone(name):
    # CUR's windows follow each row's real tokens, across left padding and chunks
    model = tiny_model()
    assert_rows_equal_alone(model, lambda: build_method(name, 0.5, model), chunk_size=16)


# QFilter

def filters_for(model, directions: dict):
    config = model.config.get_text_config()
    filters = torch.zeros(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    for (layer, head), vector in directions.items():
        filters[layer, head] = vector
    return filters


def test_qfilter_keeps_the_keys_projecting_highest_on_the_filter():
    keys = random_states(10, 6)
    e3, e5 = torch.eye(16)[3], torch.eye(16)[5]
    method = kvsqueeze.QFilter(budget=4, filters=filters_for(MODEL, {(0, 0): e3, (0, 1): -e5}))
    method.setup(MODEL)
    expected = [sorted(keys[0, 0, :, 3].topk(4).indices.tolist()), sorted((-keys[0, 1, :, 5]).topk(4).indices.tolist())]
    assert kept(method, keys) == expected


def test_qfilter_without_filters_says_how_to_make_them(tmp_path):
    with pytest.raises(ValueError, match="kvsqueeze calibrate qfilter"):
        kvsqueeze.QFilter(ratio=0.5)
    with pytest.raises(FileNotFoundError, match="kvsqueeze calibrate qfilter"):
        kvsqueeze.QFilter(ratio=0.5, filters=tmp_path / "missing.safetensors").setup(MODEL)
    with pytest.raises(RuntimeError, match="not loaded"):
        kvsqueeze.QFilter(ratio=0.5, filters="x").score(context(random_states(4, 0), random_states(4, 1)))


def test_bad_calibration_files_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable kvsqueeze calibration file"):
        kvsqueeze.QFilter(ratio=0.5, filters=corrupt).setup(MODEL)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"filters": torch.zeros(4, 2, 16)}, str(foreign))
    with pytest.raises(ValueError, match="is not a kvsqueeze calibration file"):
        kvsqueeze.QFilter(ratio=0.5, filters=foreign).setup(MODEL)
    path = tmp_path / "filters.safetensors"
    calibration.save_calibration(path, "qfilter", {"filters": torch.zeros(4, 2, 16)}, MODEL)
    with pytest.raises(ValueError, match="holds qfilter calibration, not expected_attention"):
        kvsqueeze.ExpectedAttention(ratio=0.5, stats=path).setup(MODEL)
    other = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"shape \(4, 2, 16\).*needs \(4, 4, 16\).*another model"):
        kvsqueeze.QFilter(ratio=0.5, filters=path).setup(other)
    with pytest.raises(ValueError, match="no 'covariance' tensor"):
        kvsqueeze.ExpectedAttention(stats={"mean": torch.zeros(4, 4, 16)}).setup(MODEL)


def test_qfilter_frees_half_the_cache_on_tiny_models_of_every_family(family):
    # test_methods' generic tests build methods without files: QFilter's half-freed and budget checks are here
    model = tiny_model(family)
    ctx = compress(model, None, random_ids(120, seed=3), build_method("qfilter", 0.5, model))
    layers = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert all(int(layer.kept_per_head().min()) == int(layer.kept_per_head().max()) == 60 for layer in layers)
    assert sum(layer.nbytes() for layer in layers) <= 0.5 * sum(layer.peak_bytes for layer in layers) * 1.01
    assert all(layer.get_seq_length() == 120 for layer in layers)
    assert ctx.generate(random_ids(5, seed=4), max_new_tokens=3).shape[-1] == 3
    filters = build_method("qfilter", 0.5, model).filters
    ctx = compress(model, None, random_ids(100), kvsqueeze.QFilter(budget=40, filters=filters))
    layers = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert all(int(layer.kept_per_head().max()) == 40 for layer in layers)


def test_expected_attention_with_stats_runs_on_tiny_models_of_every_family(family):
    model = tiny_model(family)
    config = model.config.get_text_config()
    stats = {"mean": torch.randn(config.num_hidden_layers, config.num_attention_heads, config.head_dim),
             "covariance": torch.eye(config.head_dim).expand(config.num_hidden_layers, config.num_attention_heads,
                                                               -1, -1)}
    ctx = compress(model, None, random_ids(60), kvsqueeze.ExpectedAttention(ratio=0.5, stats=stats))
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.05)
    assert ctx.generate(random_ids(4, seed=1), max_new_tokens=3).shape[-1] == 3


# Calibration on the bundled model

class AttentionProbe(Method):
    """Records, per layer, the mean attention of the last 64 queries over the keys and the keys themselves."""

    def __init__(self):
        self.layers = {}

    def compress(self, ctx):
        self.layers[ctx.layer_idx] = (ctx.per_kv_head(last_queries_attention(ctx, 64))[0].mean(1), ctx.keys[0].float())


def spearman(a, b):
    ra, rb = (x.argsort(-1).argsort(-1).float() for x in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return ((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).mean()


def test_qfilter_calibration_on_the_bundled_model(bundled, tmp_path):
    model, tokenizer = bundled
    filters = calibration.qfilter_filters(model, tokenizer, samples=2, tokens=200, progress=False)
    assert filters.shape == (30, 3, 64)
    assert torch.allclose(filters.norm(dim=-1), torch.ones(30, 3), atol=1e-5)
    path = tmp_path / "qfilter.safetensors"
    calibration.save_calibration(path, "qfilter", {"filters": filters}, model, {"samples": 2})
    assert torch.equal(calibration.load_calibration(path, "qfilter", model)["filters"], filters)
    # on other text, keys that project higher on the filters are those the queries attend to more
    probe = AttentionProbe()
    ids = calibration.calibration_ids(tokenizer, 1, 300, seed=7)[0]
    with probe.apply(model), torch.no_grad():
        model(ids, use_cache=True)
    correlations = torch.stack([spearman(torch.einsum("hnd,hd->hn", keys, filters[layer]), attention)
                                for layer, (attention, keys) in probe.layers.items()])
    assert correlations.mean() > 0.3


def test_expected_attention_statistics_on_the_bundled_model(bundled, tmp_path):
    model, tokenizer = bundled
    ids = calibration.calibration_ids(tokenizer, 1, 200)[0]
    stats = calibration.expected_attention_statistics(model, tokenizer, samples=1, tokens=200, progress=False)
    assert stats["mean"].shape == (30, 9, 64) and stats["covariance"].shape == (30, 9, 64, 64)
    assert torch.allclose(stats["covariance"], stats["covariance"].transpose(-1, -2), atol=1e-4)
    path = tmp_path / "stats.safetensors"
    calibration.save_calibration(path, "expected_attention", stats, model)
    loaded = calibration.load_calibration(path, "expected_attention", model)
    assert all(torch.equal(loaded[name], stats[name]) for name in stats)

    # statistics collected on the very context compressed = the context's own statistics (up to N vs N - 1)
    kept = {}

    class Recording(kvsqueeze.ExpectedAttention):
        name = ""

        def keep_mask(self, ctx):
            kept.setdefault(self.label, {})[ctx.layer_idx] = mask = super().keep_mask(ctx)
            return mask

    for label, kwargs in [("context", {}), ("saved", {"stats": path})]:
        method = Recording(ratio=0.5, **kwargs)
        method.label = label
        compress(model, None, ids, method)
    agreement = torch.stack([(kept["context"][i] == kept["saved"][i]).float().mean() for i in kept["context"]])
    assert agreement.mean() > 0.99


def test_calibrate_command_writes_files_the_methods_load(bundled, tmp_path, monkeypatch, capsys):
    model, tokenizer = bundled
    monkeypatch.setattr(kvsqueeze.models, "load", lambda name=None, **kwargs: bundled)
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"Note {i} says the lighthouse is painted red and white." for i in range(40)))
    filters, stats = tmp_path / "filters.safetensors", tmp_path / "stats.safetensors"
    assert main(["calibrate", "qfilter", "-o", str(filters), "--samples", "1", "--tokens", "150",
                 "--text-file", str(text)]) == 0
    assert main(["calibrate", "expected_attention", "-o", str(stats), "--samples", "1", "--tokens", "150"]) == 0
    assert "Q-Filters for 30 layers x 3 KV heads" in capsys.readouterr().out
    assert main(["calibrate", "qfilter", "-o", str(filters), "--tokens", "100000", "--text-file", str(text)]) == 2
    assert "fewer than one sample" in capsys.readouterr().err

    document = " ".join(calibration.haystack(tokenizer, 350, seed=3))
    for method in (kvsqueeze.CUR(ratio=0.5), kvsqueeze.QFilter(ratio=0.5, filters=filters),
                   kvsqueeze.ExpectedAttention(ratio=0.5, stats=stats)):
        ctx = compress(model, tokenizer, document, method)
        assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.02)
        assert ctx.stats.bytes_held < 0.6 * ctx.stats.bytes_uncompressed
        assert isinstance(ctx.ask("What is the text about?", max_new_tokens=8), str)


@pytest.mark.parametrize("kind, options, build", [
    ("lukv", ["--tokens", "200"], lambda path: kvsqueeze.LUKV(ratio=0.5, curves=path)),
    ("kvzap", ["--tokens", "200"], lambda path: kvsqueeze.KVzap(ratio=0.5, surrogate=path)),
    ("fastkvzip", ["--tokens", "200", "--steps", "20"], lambda path: kvsqueeze.FastKVzip(ratio=0.5, gates=path)),
    ("restorekv", ["--tokens", "150", "--steps", "1"], lambda path: kvsqueeze.RestoreKV(ratio=0.5, adapter=path)),
])
def test_kvsqueeze_calibrate_writes_a_file_the_method_loads(bundled, tmp_path, monkeypatch, kind, options, build):
    monkeypatch.setattr(kvsqueeze.models, "load", lambda *args, **kwargs: bundled)
    out = tmp_path / f"{kind}.safetensors"
    assert main(["calibrate", kind, "-o", str(out), "--samples", "1", *options]) == 0
    model, tokenizer = bundled
    ctx = kvsqueeze.compress(model, tokenizer, "The sky is blue. " * 20, build(str(out)))
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.05)
