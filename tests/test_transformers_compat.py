"""kvsqueeze on the transformers release installed: the cache reaches every method, and a miss is never silent.

These run in CI on both ends of the supported range (`.ci/run`, marker `compat`).
"""

import functools
import warnings

import pytest
import torch
import transformers

import kvsqueeze
from kvsqueeze import hooks, models
from kvsqueeze.forward import CompressionNotAppliedError
from conftest import CACHE_ARGUMENT, deprecations, no_logged_deprecation, random_ids, tiny_model

pytestmark = pytest.mark.compat


def test_the_cache_argument_is_the_one_the_installed_transformers_takes():
    assert models.cache_argument(tiny_model()) == CACHE_ARGUMENT


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compression_reaches_every_layer_it_compresses(family):
    ctx = kvsqueeze.compress(tiny_model(family), None, random_ids(60), kvsqueeze.KNorm(ratio=0.5))
    cache = ctx.cache
    assert cache.compressible and all(cache.layers[i].stored == 30 for i in cache.compressible)


def missing_last_attention_module(monkeypatch):
    """Simulate a transformers release where kvsqueeze's hook never sees one layer."""
    found = models.attention_modules
    monkeypatch.setattr(models, "attention_modules", lambda model: found(model)[:-1])


def test_compress_raises_when_a_layer_is_never_reached(monkeypatch):
    missing_last_attention_module(monkeypatch)
    with pytest.raises(CompressionNotAppliedError, match=rf"layers \[3\].*transformers {transformers.__version__}"):
        kvsqueeze.compress(tiny_model(), None, random_ids(60), kvsqueeze.KNorm(ratio=0.5))


def test_compress_raises_when_the_model_ignores_the_cache_it_is_given(monkeypatch):
    """A renamed model argument: the model builds its own cache and kvsqueeze's stays empty."""
    model = tiny_model()
    forward = model.model.forward

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        kwargs.pop(CACHE_ARGUMENT, None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", renamed)
    with pytest.raises(CompressionNotAppliedError, match=r"layers \[0, 1, 2, 3\]"):
        kvsqueeze.compress(model, None, random_ids(60), kvsqueeze.SnapKV(ratio=0.5))


def test_apply_around_generate_raises_when_a_layer_is_never_reached(monkeypatch):
    missing_last_attention_module(monkeypatch)
    model, ids = tiny_model(), random_ids(40)
    with pytest.raises(CompressionNotAppliedError, match="KNorm"):
        with kvsqueeze.KNorm(ratio=0.5).apply(model):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    with kvsqueeze.KNorm(ratio=0.5).apply(model):  # the failed forward left no state behind
        pass
    assert kvsqueeze.forward.current() is None


def test_kvsqueeze_calls_use_the_current_names(recwarn):
    """No deprecation warning from kvsqueeze's own calls into transformers (prefill, generate)."""
    warnings.simplefilter("always")
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.SnapKV(ratio=0.5), chunk_size=16)
    ctx.generate(random_ids(4, seed=1), max_new_tokens=3)
    with kvsqueeze.KNorm(ratio=0.5).apply(model):
        model.generate(random_ids(30), attention_mask=torch.ones(1, 30, dtype=torch.long), max_new_tokens=2,
                       do_sample=False)
    deprecations = [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]


def test_attention_modules_give_the_scaling_that_attention_scores_read(family):
    model = tiny_model(family)
    config = model.config
    expected = getattr(config, "query_pre_attn_scalar", None) or config.head_dim
    for module in models.attention_modules(model):
        assert module.scaling == expected ** -0.5  # LayerContext.scaling reads it (and refuses a module without it)


def test_a_deprecation_transformers_only_logs_reaches_the_check_that_fails_the_test():
    from transformers.utils import logging as transformers_logging

    with no_logged_deprecation() as collected:  # what every test runs in (conftest's autouse fixture)
        transformers_logging.get_logger("transformers.models.llama").warning("a message from a model's module")
    assert collected.messages == ["a message from a model's module"]  # transformers' logger does not propagate
    assert deprecations(["`past_key_values` is deprecated; use `cache`", "other"]) == [
        "`past_key_values` is deprecated; use `cache`"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_rotary_at_gives_each_layer_its_own_rotation(family):
    """Gemma 3's global layers rotate with another base than its local ones (the rotary's `layer_type`)."""
    seen = {}

    def record(ctx):
        seen[ctx.layer_idx] = (ctx.position_embeddings, ctx.rope.at(torch.arange(ctx.n_new)))

    model = tiny_model(family)
    with hooks.observing(model, record):
        kvsqueeze.compress(model, None, random_ids(24))
    assert seen
    for given, computed in seen.values():
        torch.testing.assert_close(computed, given)


def test_the_suite_runs_on_releases_pyproject_allows_and_each_fast_moving_one_is_bounded():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    required = {r.name: r for r in map(Requirement, pyproject["project"]["dependencies"])}
    for name in ("torch", "transformers"):
        assert any(spec.operator == "<" for spec in required[name].specifier), f"{name} has no upper bound"
        assert required[name].specifier.contains(version(name), prereleases=True), (name, version(name))
