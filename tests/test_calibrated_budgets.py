"""LU-KV: the offline curves (convex hull, greedy allocation, oracle importance), per-head budgets, curve files."""


import numpy as np
import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.budgets import top_k_per_head
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.lukv import (GLOBAL_RATIOS, CurveBudget, allocate, antitonic, budget_curves, calibrate_lukv,
                                    load_curves, oracle_importance)
from kvsqueeze.budgets import Uniform
from conftest import cached, layer_types, random_ids, tiny_model


# The offline optimisation

def test_antitonic_pools_adjacent_violators():
    assert antitonic(torch.tensor([1.0, 3.0, 2.0, 0.0])).tolist() == [2.0, 2.0, 2.0, 0.0]
    assert antitonic(torch.tensor([4.0, 2.0, 2.0, 1.0])).tolist() == [4.0, 2.0, 2.0, 1.0]  # already non-increasing
    gains = torch.rand(50, generator=torch.Generator().manual_seed(0))
    hull = antitonic(gains)
    assert (hull[1:] <= hull[:-1] + 1e-6).all()
    # its cumulative sums are a concave majorant of the original's, meeting it at the end (the loss curve's hull)
    assert (hull.cumsum(0) >= gains.cumsum(0) - 1e-5).all()
    assert hull.sum() == pytest.approx(gains.sum().item(), rel=1e-5)


def test_greedy_allocation_follows_marginal_utility():
    gains = torch.tensor([[5.0, 4.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    # 2 tokens: 5, 4 (head 0); 4 tokens: 5, 4, 3, 3; 6 tokens: 5, 4 and four 3s
    assert allocate(gains, torch.tensor([0.75, 0.5, 0.25, 0.0])).tolist() == [[2, 0], [2, 2], [2, 4], [4, 4]]


def test_the_convex_hull_counts_a_late_payoff():
    # head 0's second token is worth 10, its first nothing: greedily on the raw gains, head 1 would take both
    # tokens (loss 10 + 8 = 18); on the hull head 0 gets them (loss 16)
    gains = torch.tensor([[[0.0, 10.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]]])  # [1 layer, 2 heads, 4 ranks]
    curves = budget_curves([gains])
    assert curves.shape == (99, 1, 2)
    assert curves[74, 0].tolist() == [0.5, 1.0]  # global ratio 0.75: 2 of 8 tokens kept
    assert curves[49, 0].tolist() == [0.5, 0.5]  # 0.5: 4 kept, the hull's 5, 5 then two 4s


def test_curves_are_averaged_over_queries_and_keep_the_global_ratio():
    first = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 1.0, 1.0, 1.0]]])
    second = first.flip(1)  # the other head is the useful one
    curves = budget_curves([first, second])
    assert curves[49, 0].tolist() == [0.5, 0.5]
    gains = [torch.rand(3, 2, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    curves = budget_curves(gains, layers=[0, 2])  # layer 1 is not compressed: it removes nothing
    assert curves[:, 1].abs().sum() == 0
    # up to rounding the total to whole tokens (of 4 x 40)
    assert curves[:, [0, 2]].mean((1, 2)).tolist() == pytest.approx(GLOBAL_RATIOS.tolist(), abs=0.5 / 160)


def test_curve_budget_interpolates_between_grid_ratios():
    prune = torch.stack([torch.tensor([[r / 2, 3 * r / 2]]) for r in GLOBAL_RATIOS.tolist()])  # [99, 1, 2]
    budget = CurveBudget(Uniform(ratio=0.505), prune, GLOBAL_RATIOS)
    assert budget.local_ratios(0.505, 0).tolist() == pytest.approx([0.2525, 0.7575])
    assert budget.layer_counts(200, 0).tolist() == [150, 48]  # 149.5 + 48.5 = 198 = 2 x 99
    assert budget.local_ratios(0.004, 0).tolist() == pytest.approx([0.002, 0.006])  # towards 0 below the grid
    assert budget.layer_counts(200, 0).sum() == 2 * Uniform(ratio=0.505).n_keep(200)


# The method

def skewed_curves(model):
    """Head 0 of every layer removes half the global ratio, head 1 one and a half times it."""
    config = model.config.get_text_config()
    prune = GLOBAL_RATIOS[:, None, None] * torch.tensor([0.5, 1.5])
    return prune.expand(99, config.num_hidden_layers, 2).clamp(max=1).contiguous()


class RecordingLUKV(kvsqueeze.LUKV):
    name = ""  # not registered

    def keep_mask(self, ctx):
        mask = super().keep_mask(ctx)
        self.seen.append((self.scores(ctx), mask))
        return mask


def test_heads_keep_their_curve_share_of_the_scorers_best_tokens(family):
    model = tiny_model(family)
    method = RecordingLUKV(ratio=0.5, curves=skewed_curves(model))
    method.seen = []
    ctx = kvsqueeze.compress(model, None, random_ids(100), method)
    assert len(method.seen) == sum(kind == "full_attention" for kind in layer_types(model.config))
    for scores, mask in method.seen:
        assert mask.sum(-1).tolist() == [[75, 25]]
        assert torch.equal(mask, top_k_per_head(scores, torch.tensor([[75, 25]])))
        assert mask[..., :4].all() and mask[..., -1].all()  # the 4 sinks and the last token
    for layer in ctx.cache.layers:
        if not isinstance(layer, kvsqueeze.SlidingWindowLayer):
            assert layer.kept_per_head().tolist() == [[75, 25]]
    assert ctx.stats.compression_ratio == pytest.approx(0.5)


def test_a_budget_in_tokens_reads_the_curve_at_its_ratio():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(100), kvsqueeze.LUKV(budget=40, curves=skewed_curves(model)))
    assert [layer.kept_per_head().tolist() for layer in ctx.cache.layers] == [[[70, 10]]] * 4


def test_without_curves_every_head_keeps_the_same_share_and_a_warning_says_how_to_profile():
    model = tiny_model("qwen3")
    with pytest.warns(UserWarning, match="kvsqueeze calibrate lukv"):
        ctx = kvsqueeze.compress(model, None, random_ids(100), kvsqueeze.LUKV(ratio=0.5))
    assert all(layer.kept_per_head().tolist() == [[50, 50]] for layer in ctx.cache.layers)


def test_settings():
    method = kvsqueeze.LUKV(ratio=0.3, curves="curves.safetensors")
    settings = method.settings()
    assert settings.pop("scorer").startswith("ExpectedAttention(")
    assert settings == {"ratio": 0.3, "curves": "curves.safetensors", "window": 1}
    assert method.scorer.epsilon == 0.02 and method.scorer.n_sink == 4
    assert kvsqueeze.LUKV(budget=64, scorer="snapkv", window=0).scorer.name == "snapkv"


# The oracle

def test_oracle_importance_is_the_most_attention_times_output_norm_of_any_answer_step():
    model = tiny_model("llama", attn="eager")
    context, question, answer = random_ids(30, seed=1), random_ids(4, seed=2), random_ids(5, seed=3)[0]
    compressed = kvsqueeze.compress(model, None, context)
    oracle = oracle_importance(model, compressed, question, answer, [0, 1, 2, 3])

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.cat([context, question, answer[None]], 1), **cached(cache), output_attentions=True)
    steps = torch.arange(30 + 4 - 1, 30 + 4 + 5 - 1)  # the last question token and the answer's but last
    for i, layer in enumerate(model.model.layers):
        weights = out.attentions[i][0][:, steps, :30].amax(1)  # [4 heads, 30]
        values = cache.layers[i].values[0, :, :30].repeat_interleave(2, 0)  # [4 heads, 30, 16]
        w_o = layer.self_attn.o_proj.weight.view(64, 4, 16)
        norms = torch.stack([(values[h] @ w_o[:, h].T).norm(dim=-1) for h in range(4)])
        expected = (weights * norms).view(2, 2, 30).amax(1)
        assert torch.allclose(oracle[i], expected, atol=1e-5)
    # the recorded scores: sinks and the last token first
    assert set(recorder.scores[0][0].argsort(descending=True)[:5].tolist()) == {0, 1, 2, 3, 29}


# On the bundled model: profiling, the file's round trip, end to end

def test_profile_the_bundled_model_and_use_its_curves(bundled, tmp_path):
    model, tokenizer = bundled
    path = tmp_path / "lukv.safetensors"
    curves = calibrate_lukv(model, tokenizer, path, samples=1, tokens=150, questions=["Summarize the text."],
                            max_new_tokens=4, progress=False)
    assert curves["prune_ratios"].shape == (99, 30, 3)
    assert curves["prune_ratios"].mean((1, 2)).tolist() == pytest.approx(GLOBAL_RATIOS.tolist(), abs=1e-4)
    prune, ratios, settings = load_curves(path, model)
    assert torch.equal(prune, curves["prune_ratios"]) and torch.equal(ratios, GLOBAL_RATIOS)
    assert settings["scorer"] == "expected_attention" and settings["queries"] == 2  # needle question + 1

    sample = needle_sample(tokenizer, 300, 0.5, seed=5)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.LUKV(ratio=0.5, curves=str(path)))
    kept = torch.cat([layer.kept_per_head() for layer in ctx.cache.layers])
    assert len(set(kept.flatten().tolist())) > 1  # head-wise budgets
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert ctx.stats.bytes_held <= 0.56 * ctx.stats.bytes_uncompressed  # ragged layers hold pages
    answer = ctx.ask(sample.question, max_new_tokens=16)
    assert isinstance(answer, str) and answer.strip()

    # kvpress / LU-KV .npy curves load too
    np.save(tmp_path / "curve.npy", curves["prune_ratios"].numpy())
    assert torch.equal(load_curves(str(tmp_path / "curve.npy"), model)[0], curves["prune_ratios"])


def test_missing_or_foreign_curve_files_say_how_to_make_one(bundled, tmp_path):
    model, _ = bundled
    with pytest.raises(FileNotFoundError, match="kvsqueeze calibrate lukv --out FILE"):
        kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.LUKV(curves=str(tmp_path / "none.safetensors")))
    (tmp_path / "junk.safetensors").write_text("not a curve")
    with pytest.raises(ValueError, match="calibrate lukv"):
        load_curves(tmp_path / "junk.safetensors", model)
    from kvsqueeze.calibration import save_calibration

    save_calibration(tmp_path / "q.safetensors", "qfilter", {"filters": torch.zeros(30, 3, 64)}, model)
    with pytest.raises(ValueError, match="not LU-KV curves"):
        load_curves(tmp_path / "q.safetensors", model)
    with pytest.raises(ValueError, match="another model"):
        load_curves(skewed_curves(tiny_model("llama")), model)
