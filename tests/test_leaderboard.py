"""`kvsqueeze leaderboard`: who runs, resuming, the ranked page, its figures and the README's section."""

import json

import pytest

from kvsqueeze import methods
from kvsqueeze.evaluation import leaderboard
from kvsqueeze.methods.h2o import H2O


def test_every_method_runs_at_every_ratio_or_is_listed_with_why():
    settings = leaderboard.Settings(ratios=[0.25, 0.75], quantizers=["kivi-4"], combined=["knorm"])
    grid, left_out = leaderboard.contenders(settings)
    ran = {c.method.partition(":")[0] for c in grid}
    assert ran | set(left_out) == set(methods.available()) | {"full"}
    assert {(c.method, c.ratio, c.quant) for c in grid if c.method in ("snapkv", "knorm")} == {
        ("snapkv", 0.25, None), ("snapkv", 0.75, None), ("knorm", 0.25, None), ("knorm", 0.75, None),
        ("knorm", 0.25, "kivi-4"), ("knorm", 0.75, "kivi-4")}
    assert ("full", None, "kivi-4") in {(c.method, c.ratio, c.quant) for c in grid}
    assert [c.ratio for c in grid if c.method == "h2o"] == [None]  # a budget of its own: once, at its defaults
    assert "calibrate qfilter" in left_out["qfilter"]
    assert any(c.method.startswith("headkv:head_scores=") for c in grid)  # the bundled model ships its calibration
    unbundled, left_out = leaderboard.contenders(leaderboard.Settings(bundled=False))
    assert "headkv" in left_out and not any(c.method.startswith("headkv") for c in unbundled)


def test_a_bad_method_fails_before_anything_runs():
    with pytest.raises(methods.UnknownMethodError, match="snapkv"):
        leaderboard.contenders(leaderboard.Settings(methods=["snapvk"]))


@pytest.mark.bundled
def test_the_leaderboard_resumes_and_writes_a_ranked_page(bundled, tmp_path, monkeypatch):
    model, tokenizer = bundled
    settings = leaderboard.Settings(ratios=[0.5], quantizers=["kivi-4"], combined=["knorm"], ruler_length=400,
                                    ruler_tasks=["niah_single_1"], needle_lengths=[400], needle_depths=2,
                                    methods=["knorm", "streaming_llm", "h2o", "qfilter"])
    out = tmp_path / "board"
    count = lambda: ((out / "ruler.jsonl").read_text().count("\n"), (out / "needle.jsonl").read_text().count("\n"))
    with monkeypatch.context() as patch:  # a configuration that raises is recorded; the others run
        patch.setattr(H2O, "compress", lambda self, ctx: 1 / 0)
        leaderboard.run(model, tokenizer, settings, out, progress=False)
    assert count() == (5, 10) and leaderboard.failures(out) == {"h2o": "ruler: ZeroDivisionError: division by zero"}
    assert "- **h2o**: `ruler: ZeroDivisionError" in leaderboard.write_page(out, tmp_path / "failed.md").read_text()
    leaderboard.run(model, tokenizer, settings, out, progress=False)  # resumed: retries what failed
    first = json.loads((out / "run.json").read_text())
    rows = count()
    assert rows == (6, 12)  # full, full+kivi-4, knorm, streaming_llm, h2o, knorm+kivi-4: 1 + 2 questions each
    assert leaderboard.failures(out) == {}
    leaderboard.run(model, tokenizer, settings, out, progress=False)  # resumed: nothing left to do
    assert count() == rows
    assert json.loads((out / "run.json").read_text())["seconds"] >= first["seconds"]

    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- leaderboard -->\nold\n<!-- /leaderboard -->\nafter\n")
    page = leaderboard.write_page(out, tmp_path / "leaderboard.md",
                                  readme=readme)
    text = page.read_text()
    ranked = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(ranked) == sorted(["full", "full + kivi-4", "knorm", "streaming_llm", "h2o", "knorm + kivi-4"])
    entries = leaderboard.entries(out)
    assert [e.mean for e in entries] == sorted((e.mean for e in entries), reverse=True)
    full = next(e for e in entries if e.label == "full")
    assert full.bytes == 1.0 and next(e for e in entries if e.label == "knorm").bytes < 0.6
    assert "**qfilter**: needs calibration" in text
    assert (tmp_path / "leaderboard_ratio.png").stat().st_size > 0 and (tmp_path / "leaderboard_bytes.png").exists()
    section = readme.read_text()
    assert section.startswith("before\n<!-- leaderboard -->\n| # | method") and section.endswith("<!-- /leaderboard -->\nafter\n")
    assert "old" not in section
