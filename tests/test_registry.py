"""A new method is one file: dropped into `kvsqueeze/methods/`, it is registered, importable from `kvsqueeze`, listed
by `kvsqueeze methods` and in the README's methods table, with no other edit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvsqueeze
from conftest import random_ids, tiny_model

MY_SCORER = '''
from .base import ScorerMethod


class MyScorer(ScorerMethod):
    """Keeps the tokens with the largest value norm, per head (a test method)."""

    name = "my_scorer"
    power: float = 2.0

    def score(self, ctx):
        return ctx.values.float().norm(dim=-1) ** self.power
'''



def test_a_method_dropped_into_a_copy_of_the_package_is_everywhere(tmp_path):
    package = tmp_path / "kvsqueeze"
    shutil.copytree(Path(kvsqueeze.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "my_scorer.py").write_text(MY_SCORER)
    script = (
        "import json, torch, kvsqueeze\n"
        "from transformers import LlamaConfig, AutoModelForCausalLM\n"
        "m = kvsqueeze.MyScorer(ratio=0.5, power=1.0)\n"
        "model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))\n"
        "ctx = kvsqueeze.compress(model, None, torch.arange(3, 43)[None], kvsqueeze.method('my-scorer', ratio=0.5))\n"
        "print(json.dumps({'file': kvsqueeze.__file__, 'repr': repr(m), 'registered': 'my_scorer' in kvsqueeze.available(),"
        " 'in_all': 'MyScorer' in kvsqueeze.methods.__all__, 'kept': ctx.cache.kept_per_head()[0].tolist()}))\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(tmp_path))  # the copy, not the installed package
    assert found == found | {"repr": "MyScorer(ratio=0.5, power=1.0)", "registered": True, "in_all": True,
                             "kept": [[20]]}
    listing = subprocess.run([sys.executable, "-m", "kvsqueeze.cli", "methods"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert "my_scorer" in listing.stdout and "power=2.0" in listing.stdout
    table = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "methods_table.py")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "`my_scorer`" in table.stdout and "largest value norm" in table.stdout


def test_settings_are_declared_once():
    method = kvsqueeze.SnapKV(ratio=0.3, window_size=16)
    assert repr(method) == "SnapKV(ratio=0.3, window_size=16, kernel_size=7, pooling='max')"
    assert method.settings() == {"ratio": 0.3, "window_size": 16, "kernel_size": 7, "pooling": "max"}
    json.dumps(kvsqueeze.AdaKV(ratio=0.5).settings())  # nested methods as text: fit for result files
    with pytest.raises(TypeError):
        kvsqueeze.SnapKV(window=16)  # not a setting


def test_wrappers_pass_everything_on_through_one_mechanism():
    class Seen(kvsqueeze.KNorm):
        name = ""

        def before_forward(self, kwargs):
            kwargs.setdefault("seen_by", []).append(self)

    inner = Seen(ratio=0.5)
    for wrapper in (kvsqueeze.AdaKV(scorer=inner), kvsqueeze.Composed([inner]), kvsqueeze.KeyRerotation(method=inner),
                    kvsqueeze.DecodingBudget(scorer=inner), kvsqueeze.Chunk(scorer=inner)):
        kwargs = {}
        wrapper.before_forward(kwargs)
        assert kwargs["seen_by"] == [inner], type(wrapper).__name__
        assert wrapper.parts() == [inner]
    assert kvsqueeze.Composed(["knorm", "kvzip"]).has("after_prefill")
    assert kvsqueeze.KeyRerotation(method=kvsqueeze.MInference()).has("attention")
    assert not kvsqueeze.AdaKV().has("whole_context") and kvsqueeze.Chunk().has("whole_context")


def method_cost():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import method_cost
    finally:
        sys.path.pop(0)
    return method_cost


@pytest.mark.parametrize("name", sorted(kvsqueeze.available()))
def test_extra_work_is_what_the_docstring_says_it_costs(name):
    """`extra_work` (what benchmarks/method_cost.py allows a method beyond a plain prefill) is declared exactly where
    the docstring states an inherent cost."""
    cls = kvsqueeze.available()[name]
    assert bool(cls.extra_work) == ("Inherent cost" in cls.__doc__), name


def test_the_cost_benchmark_measures_every_kind_of_extra_work_declared():
    kinds = {kind for cls in kvsqueeze.available().values() for kind in cls.extra_work}
    model, ids = tiny_model(), random_ids(300)
    for kind in sorted(kinds):
        assert method_cost().extra_work_seconds(model, ids, kind, reps=1) > 0, kind


def test_a_wrapper_has_the_extra_work_of_what_it_wraps():
    assert kvsqueeze.AdaKV(scorer=kvsqueeze.KNorm()).inherent_work() == ()
    assert kvsqueeze.Composed([kvsqueeze.H2O(), kvsqueeze.CriticalKV(), "kvgrad"]).inherent_work() == (
        "attention", "output_projection", "second_forward", "backward")


def test_a_cost_row_is_bounded_by_the_extra_work_measured_in_its_own_run(tmp_path):
    """Rows of several runs stand in one table: each carries the extra work measured beside its own baseline, and a
    later run's measurement of that work (on a machine of another speed) does not move its bound."""
    row = {"length": 2048, "config": "h2o", "extra_work": ["attention"], "extra_work_s": {"attention": 1.2},
           "prefill_s": 3.2, "plain_prefill_s": 2.0, "prefill_ratio": 1.6, "peak_mib": 1, "bytes_share": 0.5,
           "decode_ratio": 1.0}
    later = {"length": 2048, "config": "extra_work:attention", "seconds": 0.1}
    path = tmp_path / "cost.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (row, later)) + "\n")
    text = method_cost().table(str(path), None)
    assert "1.60x (≤ 1.84x)" in text and "over" not in text


def test_a_cost_ratio_is_the_median_of_alternated_pairs_not_moved_by_one_lucky_run():
    pair_ratio = method_cost().pair_ratio
    assert pair_ratio([1.1, 2.2, 1.05], [1.0, 2.0, 1.0]) == pytest.approx(1.1)  # the load doubled mid-run
    assert pair_ratio([1.0, 1.0, 1.0], [1.0, 0.5, 1.0]) == pytest.approx(1.0)  # one lucky baseline
    with pytest.raises(ValueError):
        pair_ratio([1.0, 1.0], [1.0])


def test_a_cost_row_keeps_every_run_it_was_measured_from():
    model, ids = tiny_model(), random_ids(96)
    full = kvsqueeze.compress(model, None, ids, check_window=False)
    question = random_ids(4)
    row = method_cost().measured(model, ids, question, kvsqueeze.KNorm(ratio=0.5), None, 2, full)
    assert len(row["prefill_runs_s"]) == len(row["plain_prefill_runs_s"]) == 2
    assert len(row["decode_runs_s"]) == len(row["full_decode_runs_s"]) == 2
    pairs = [m / p for m, p in zip(row["prefill_runs_s"], row["plain_prefill_runs_s"])]
    assert row["prefill_ratio"] == pytest.approx(sum(pairs) / 2)  # the median of two
    assert row["bytes_share"] == pytest.approx(0.5, abs=0.05)
