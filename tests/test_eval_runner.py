"""`kvsqueeze eval`: sweeps resume without redoing work, shards merge, tables and plots come out."""

import json

import pytest

import kvsqueeze
from kvsqueeze import cli, evaluation
from kvsqueeze.prompt import Prompt
from kvsqueeze.evaluation import runner

pytestmark = pytest.mark.bundled


@pytest.fixture
def needle():
    return evaluation.benchmark("needle", lengths=[200, 300])


class Interrupted(Exception):
    """The sweep is stopped in the middle (as by Ctrl-C or a killed job)."""


GRID = evaluation.configurations(["full", "streaming_llm"], [0.5], [None])


def test_an_interrupted_sweep_finishes_without_redoing_what_was_done(bundled, needle, tmp_path, monkeypatch):
    model, tokenizer = bundled
    out = tmp_path / "needle.jsonl"
    calls, interrupt = [], [True]
    real_answer = runner.answer

    def counting(*args, **kwargs):  # counts the answers computed; the third one is interrupted
        for answered in real_answer(*args, **kwargs):
            calls.append(answered)
            if len(calls) == 3 and interrupt and interrupt.pop():
                raise Interrupted
            yield answered

    monkeypatch.setattr(runner, "answer", counting)
    with pytest.raises(Interrupted):
        evaluation.sweep(model, tokenizer, needle, GRID, out, samples=2, progress=False)
    assert len(evaluation.read_results(out)) == 2
    calls.clear()
    written = evaluation.sweep(model, tokenizer, needle, GRID, out, samples=2, progress=False)
    assert len(calls) == 6 and len(written) == 6  # 2 configurations x 4 samples, 2 of them done before
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 == len({runner.row_key(r) for r in rows})
    calls.clear()
    assert evaluation.sweep(model, tokenizer, needle, GRID, out, samples=2, progress=False) == [] and not calls


def test_shards_split_the_samples_and_merge_back(bundled, needle, tmp_path):
    model, tokenizer = bundled
    grid = GRID[:1]
    for i in range(2):
        evaluation.sweep(model, tokenizer, needle, grid, tmp_path / f"shard{i}.jsonl", samples=2, shard=(i, 2),
                         progress=False)
    parts = [evaluation.read_results(tmp_path / f"shard{i}.jsonl") for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    assert not {runner.row_key(r) for r in parts[0]} & {runner.row_key(r) for r in parts[1]}
    merged = evaluation.read_results(tmp_path / "shard0.jsonl", tmp_path / "shard1.jsonl", tmp_path / "shard0.jsonl")
    assert len(merged) == 4
    with pytest.raises(ValueError, match="shard"):
        evaluation.sweep(model, tokenizer, needle, grid, tmp_path / "x.jsonl", shard=(2, 2))


def test_rows_carry_the_measured_compression_and_the_run_metadata(bundled, needle, tmp_path):
    model, tokenizer = bundled
    rows = evaluation.sweep(model, tokenizer, needle, GRID, tmp_path / "r.jsonl", samples=1, progress=False,
                            metadata=runner.run_metadata({"why": "test"}))
    full, streaming = rows[0], rows[-1]
    assert full["score"] == 100.0 and full["answers"][0] in full["prediction"]
    assert full["bytes_held"] == full["bytes_uncompressed"] and full["compression_ratio"] == 0
    assert streaming["bytes_held"] < 0.55 * streaming["bytes_uncompressed"]
    assert streaming["compression_ratio"] == pytest.approx(0.5, abs=0.02)
    run = full["run"]
    assert run["versions"]["transformers"] and run["arguments"] == {"why": "test"} and run["device"]
    table = evaluation.markdown_table(rows)
    assert "| full | — | — | 100.0 | 100.0 | 100.0 | 100% |" in table


def test_query_aware_compression_sees_the_question(bundled, tmp_path):
    model, tokenizer = bundled
    needle = evaluation.benchmark("needle", lengths=[400], depths=[0.1])
    grid = evaluation.configurations(["snapkv"], [0.5], [None])
    rows = evaluation.sweep(model, tokenizer, needle, grid, tmp_path / "q.jsonl", query_aware=True, progress=False)
    assert rows[0]["query_aware"] and rows[0]["context_tokens"] > 400  # the question is part of the context


def test_the_eval_command_reads_a_yaml_sweep_and_writes_table_and_plots(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("benchmark: needle\nlength: [200]\nmethods: [full, knorm]\nratios: [0.5]\nsamples: 2\n")
    out = tmp_path / "results" / "needle.jsonl"
    assert cli.main(["eval", "--config", str(config), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| knorm | 0.5 | — |" in printed
    assert out.with_suffix(".png").exists() and (out.parent / "needle_heatmap.png").exists()
    assert cli.main(["report", str(out), "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").exists()
    assert cli.main(["eval", "-b", "nonesuch"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert cli.main(["eval", "-b", "needle", "-m", "nonesuch"]) == 2
    assert cli.main(["eval", "-b", "longbench", "-p", "cot=true"]) == 2  # longbench_v2's setting, not longbench's
    assert "longbench has no setting cot" in capsys.readouterr().err


def test_longbench_e_rows_are_averaged_over_tasks_within_each_length_bucket():
    def row(task, bucket, score, method="full", ratio=None):
        return {"method": method, "ratio": ratio, "quant": None, "task": task, "score": score, "bytes_held": 1,
                "bytes_uncompressed": 1, "metadata": {"length_bucket": bucket}}

    rows = [row("trec", "0-4k", 100.0), row("trec", "0-4k", 50.0), row("trec", "8k+", 0.0), row("qasper", "0-4k", 25.0),
            row("qasper", "4-8k", 40.0), row("trec", "0-4k", 10.0, "knorm", 0.5)]
    assert evaluation.bucket_table(rows).splitlines()[2:] == [
        "| full | — | — | 50.0 | 40.0 | 0.0 |",  # 0-4k: trec's mean 75 and qasper's 25, averaged
        "| knorm | 0.5 | — | 10.0 | — | — |"]
    assert evaluation.bucket_table([{**r, "metadata": {}} for r in rows]) is None


def test_a_sample_without_chat_template_is_prompted_bare(bundled, tmp_path):
    model, tokenizer = bundled

    class Few(evaluation.Benchmark):
        name = ""  # not registered

        def __init__(self, chat_template):
            self.chat_template = chat_template

        def samples(self, tokenizer, n=None, seed=0):
            question = evaluation.Question("\nQ: the colour of the sky?\nA:", ["blue"], max_new_tokens=4)
            return [evaluation.Sample("s", "few", "Q: the colour of grass?\nA: green", [question],
                                      chat_template=self.chat_template)]

        def score(self, prediction, question, task):
            return 0.0

    grid = evaluation.configurations(["full"], [], [None])
    bare, chat = (evaluation.sweep(model, tokenizer, Few(t), grid, tmp_path / f"{t}.jsonl", progress=False)[0]
                  for t in (False, True))
    assert bare["context_tokens"] == len(tokenizer("Q: the colour of grass?\nA: green").input_ids)
    assert chat["context_tokens"] > bare["context_tokens"] + 10  # the template's system and user headers


def test_a_question_with_a_next_step_asks_it_alone_and_scores_its_answer(bundled, tmp_path):
    model, tokenizer = bundled

    answered = []

    def answer_step(reasoning):
        header = Prompt.for_tokenizer(tokenizer).context_ids("")  # the prompt's header alone
        answered.append(kvsqueeze.compress(model, tokenizer, header).ask(f"Say yes or no: {reasoning.strip()}",
                                                                     max_new_tokens=5))  # the step alone
        return evaluation.Question(f"Say yes or no: {reasoning.strip()}", ["unused"], max_new_tokens=5)

    class Stepped(evaluation.Benchmark):
        name = ""  # not registered

        def samples(self, tokenizer, n=None, seed=0):
            question = evaluation.Question("What colour is grass?", ["green"], max_new_tokens=6, then=answer_step)
            return [evaluation.Sample("s", "stepped", "Grass is green and the sky is blue.", [question])]

        def score(self, prediction, question, task):
            return 100.0 * (prediction == answered[-1])  # the last answer, against the first question's references

    grid = evaluation.configurations(["full", "knorm"], [0.5], [None])
    rows = evaluation.sweep(model, tokenizer, Stepped(), grid, tmp_path / "s.jsonl", progress=False)
    assert len(rows) == len(answered) == 2
    for row, alone in zip(rows, answered):
        assert len(row["steps"]) == 1 and row["prediction"] == alone and row["score"] == 100.0
        assert row["answers"] == ["green"]


def test_a_configuration_that_raises_is_recorded_and_the_others_go_on(bundled, needle, tmp_path, monkeypatch, capsys):
    model, tokenizer = bundled
    out = tmp_path / "needle.jsonl"
    monkeypatch.setattr(kvsqueeze.StreamingLLM, "score", lambda self, ctx: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        evaluation.sweep(model, tokenizer, needle, GRID, out, samples=1, progress=False)
    rows = evaluation.sweep(model, tokenizer, needle, GRID, out, samples=1, progress=False, errors="record")
    assert [row["method"] for row in rows] == ["full", "full"]  # the needle's two lengths, the full cache only
    logged = [json.loads(line) for line in runner.errors_path(out).read_text().splitlines()]
    assert [(row["method"], row["ratio"]) for row in logged] == [("streaming_llm", 0.5)] * 2
    assert runner.read_errors(out) == {("streaming_llm", 0.5, None): "ZeroDivisionError: division by zero"}
    assert cli.main(["eval", "-b", "needle", "--length", "200,300", "-m", "full,streaming_llm", "-r", "0.5",
                     "-n", "1", "-o", str(out), "--keep-going"]) == 1  # resumed: retried, failed again, said so
    assert "streaming_llm ratio=0.5 failed: ZeroDivisionError" in capsys.readouterr().err
    monkeypatch.undo()
    rows = evaluation.sweep(model, tokenizer, needle, GRID, out, samples=1, progress=False, errors="record")
    assert [row["method"] for row in rows] == ["streaming_llm"] * 2 and runner.read_errors(out) == {}
