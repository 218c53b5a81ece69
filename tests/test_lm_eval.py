"""The lm-evaluation-harness model "kvsqueeze": its compression protocol, and method=none equal to lm-eval's `hf`.

Two small local tasks (tests/data/lm_eval: YAML over JSONL, nothing from a hub): `kvsqueeze_choice` (multiple
choice: loglikelihood requests) and `kvsqueeze_qa` (generate_until requests), run with batch size 2.
"""

import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'kvsqueeze[lm-eval]' "
                                                "(scripts/setup.sh installs it)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import kvsqueeze  # noqa: E402
from kvsqueeze import cli  # noqa: E402
from kvsqueeze.integrations import lm_eval as integration  # noqa: E402

TASKS_DIR = os.path.join(os.path.dirname(__file__), "data", "lm_eval")
TASKS = ["kvsqueeze_choice", "kvsqueeze_qa"]
pytestmark = pytest.mark.bundled


@pytest.fixture(autouse=True)
def offline_in_task_folder(monkeypatch):
    """The task YAMLs name their JSONL files relative to their folder; nothing may come from a hub."""
    monkeypatch.chdir(TASKS_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=TASKS_DIR)


@pytest.fixture
def compressions(monkeypatch):
    """Every CompressedContext the integration makes, in order, with the token rows it was given."""
    made, compress = [], kvsqueeze.compress

    def spy(model, tokenizer, context, method=None, **kwargs):
        ctx = compress(model, tokenizer, context, method, **kwargs)
        made.append((ctx, [row.tolist() for row in context]))
        return ctx

    monkeypatch.setattr(kvsqueeze, "compress", spy)
    return made


def evaluate(lm, task_manager, **kwargs):
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, log_samples=True, **kwargs)


def metrics(results) -> dict:
    return {task: {name: value for name, value in values.items() if "," in name and "stderr" not in name}
            for task, values in results["results"].items()}


def test_method_none_equals_lm_evals_hf_model(bundled, task_manager, capsys):
    model, tokenizer = bundled
    hf = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2), task_manager)
    ours = evaluate(integration.KVSqueezeLM(pretrained=model, tokenizer=tokenizer, method="none", query_tokens=8,
                                            batch_size=2), task_manager)
    with capsys.disabled():
        print(f"\nlm-eval on the local tasks, batch size 2: hf {metrics(hf)}\n  kvsqueeze method=none {metrics(ours)}")
    assert metrics(ours) == metrics(hf)
    for task in TASKS:
        for theirs, mine in zip(hf["samples"][task], ours["samples"][task], strict=True):
            for (a, *_), (b, *_) in zip(theirs["resps"], mine["resps"], strict=True):
                if task == "kvsqueeze_qa":
                    assert b == a  # the same generated text
                else:
                    assert b[1] == a[1] and b[0] == pytest.approx(a[0], abs=1e-3)  # greedy flag, log-probability


def test_registered_model_compresses_what_model_args_say(task_manager, compressions):
    results = lm_eval.simple_evaluate(
        model="kvsqueeze", model_args="method=snapkv,ratio=0.5,quantizer=kivi-4,query_tokens=8,method_window_size=4",
        tasks=TASKS, task_manager=task_manager, batch_size=2, limit=2)
    assert set(metrics(results)) == set(TASKS)
    info = results["config"]
    assert "SnapKV(ratio=0.5" in info["kvsqueeze_method"] and "window_size=4" in info["kvsqueeze_method"]
    assert info["kvsqueeze_quantizer"]["name"] == "kivi"
    assert compressions and all(len(rows) == 2 for _, rows in compressions)  # batches of two contexts
    for ctx, _ in compressions:
        assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.05)
        assert ctx.stats.quantizer["name"] == "kivi"
        assert ctx.stats.bytes_held < 0.4 * ctx.stats.bytes_uncompressed


def make_lm(bundled, **kwargs):
    model, tokenizer = bundled
    return integration.KVSqueezeLM(pretrained=model, tokenizer=tokenizer, batch_size=2, **kwargs)


def test_loglikelihood_compresses_the_context_but_its_last_token(bundled, compressions):
    lm = make_lm(bundled, method="streaming_llm", ratio=0.5)
    context = lm.tok_encode("The red fox jumped over the lazy dog in the old yard.")
    continuation = lm.tok_encode(" Yes")
    [(logprob, _)] = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
    [(ctx, rows)] = compressions
    assert rows == [context[:-1]]
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.1)
    # the last context token and the continuation are fed on that compressed cache
    logits = lm.logits_on(ctx, [context[-1:] + continuation[:-1]])[0]
    assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, continuation[0]]), abs=1e-5)
    none = make_lm(bundled)._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)[0][0]
    assert logprob != pytest.approx(none, abs=1e-3)  # evicting half of a short context changes the score


def test_loglikelihood_without_a_method_equals_one_forward(bundled):
    lm = make_lm(bundled)
    model = bundled[0]
    pairs = [(lm.tok_encode("A short one."), lm.tok_encode(" And more")),
             (lm.tok_encode("A much longer context, so that the batch is padded on the left."), lm.tok_encode(" Fine")),
             ([lm.prefix_token_id], lm.tok_encode(" Nothing to compress before this"))]
    scored = lm._loglikelihood_tokens([(None, c, t) for c, t in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, scored):
        ids = torch.tensor([context + continuation[:-1]])
        with torch.no_grad():
            logits = torch.log_softmax(model(ids).logits[0, -len(continuation):].float(), -1)
        target = torch.tensor(continuation)
        assert logprob == pytest.approx(float(logits.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == target).all())


def generation_request(text: str, until=("\n",)) -> Instance:
    return Instance(request_type="generate_until", doc={}, idx=0,
                    arguments=(text, {"until": list(until), "max_gen_toks": 6, "do_sample": False}))


PROMPT = ("The harbour town of Kelmsby has two lighthouses. The northern one is red, the southern one is grey. "
          "Fishing boats leave before dawn.\nQuestion: What colour is the northern lighthouse?\nAnswer:")


def test_generation_keeps_the_last_query_tokens_uncompressed(bundled, compressions):
    lm = make_lm(bundled, method="knorm", ratio=0.5, query_tokens=10)
    short = "Say hi:"  # at most query_tokens: nothing to compress, the model alone answers
    answers = lm.generate_until([generation_request(PROMPT), generation_request(short)], disable_tqdm=True)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    [(ctx, rows)] = compressions
    assert rows == [lm.tok_encode(PROMPT)[:-10]]
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.05)
    reference = HFLM(pretrained=bundled[0], tokenizer=bundled[1], batch_size=1)
    assert answers[1] == reference.generate_until([generation_request(short)], disable_tqdm=True)[0]


def test_generation_split_keeps_the_question_uncompressed(bundled, compressions):
    lm = make_lm(bundled, method="knorm", ratio=0.5, split="\\nQuestion:")
    lm.generate_until([generation_request(PROMPT)], disable_tqdm=True)
    [(ctx, [prefix])] = compressions
    ids = lm.tok_encode(PROMPT)
    assert ids[:len(prefix)] == prefix
    assert lm.tok_decode(ids[len(prefix):]).lstrip("\n").startswith("Question:")
    assert lm.tok_decode(prefix).endswith("dawn.")
    compressions.clear()  # a prompt without the split text falls back to query_tokens
    unmarked = "No marker in this prompt, only words and more words. " * 8
    lm.generate_until([generation_request(unmarked)], disable_tqdm=True)
    assert compressions[0][1] == [lm.tok_encode(unmarked)[:-64]]


def test_decode_methods_act_while_generating(bundled, compressions):
    lm = make_lm(bundled, method="decoding_budget", budget=16, method_interval=4, query_tokens=8)
    assert lm.prefill_method is None and lm.decode_method is not None
    lm.generate_until([generation_request(PROMPT)], disable_tqdm=True)
    [(ctx, _)] = compressions
    assert ctx.stats.compression_ratio == 0  # nothing evicted at prefill


@pytest.mark.parametrize("arguments, message", [
    ({"method": "no_such_method"}, "unknown method"),
    ({"method": "think", "ratio": 0.5}, "takes no ratio"),
    ({"method": "snapkv", "method_windowsize": 3}, "no setting windowsize"),
    ({"method": "none", "ratio": 0.5}, "compresses nothing"),
    ({"query_tokens": 0}, "at least 1"),
    ({"quantizer": "zip-3"}, "unknown quantizer"),
])
def test_bad_model_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        integration.KVSqueezeLM(pretrained="bundled", **arguments)


def test_auto_batch_size_is_refused():
    with pytest.raises(ValueError, match="not 'auto'"):
        integration.KVSqueezeLM(pretrained="bundled", batch_size="auto")


def test_kvsqueeze_lm_eval_runs_lm_evals_command_line(capsys):
    code = cli.main(["lm-eval", "run", "--model", "kvsqueeze", "--model_args", "method=streaming_llm,ratio=0.5",
                     "--tasks", "kvsqueeze_choice", "--include_path", TASKS_DIR, "--limit", "1", "--batch_size", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "kvsqueeze_choice" in out and "acc" in out and "'method': 'streaming_llm'" in out


def test_rolling_loglikelihood_compresses_what_each_window_is_given(bundled, compressions):
    """lm-eval scores a text in windows of max_length tokens, each from the context its window leaves (one token
    for a full window, so nothing to compress); without a method, the same log-likelihood as lm-eval's hf."""
    model, tokenizer = bundled
    text = "The lighthouse keeper's stew uses seven bay leaves, picked from the garden of the old customs house."
    request = Instance(request_type="loglikelihood_rolling", doc={}, idx=0, arguments=(text,))
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=12).loglikelihood_rolling(
        [request], True)
    none = make_lm(bundled, max_length=12).loglikelihood_rolling([request], True)
    assert none[0] == pytest.approx(theirs[0], abs=1e-3)
    compressions.clear()
    make_lm(bundled, method="snapkv", ratio=0.5, max_length=12).loglikelihood_rolling([request], True)
    tokens = len(tokenizer(text).input_ids)  # 20 tokens: a full window of 12, then the last 8 after 5 of context
    assert tokens == 20 and [rows for _, rows in compressions] == [[tokenizer(text).input_ids[7:11]]]
