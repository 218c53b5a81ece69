"""`kvsqueeze serve` through real HTTP clients (the `openai` package, httpx) against a server on a free local port."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import kvsqueeze
from serving import DOCUMENT, MODEL, Server, ask, served_model, streamed, tokenizer

TEXT_A, TEXT_B, TEXT_C = DOCUMENT[:1400], DOCUMENT[1400:2400], DOCUMENT[2400:3200]


@pytest.fixture(scope="module")
def model():
    return served_model()


def reference(model, text, question, method=None, quantizer=None, **kwargs) -> str:
    """What CompressedContext.ask answers, in this process, on the same context and settings."""
    ctx = kvsqueeze.compress(model, tokenizer(), text, method, quantizer=quantizer)
    return ctx.ask(question, **kwargs)


def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def create(http, **body) -> dict:
    response = http.post("/v1/contexts", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_equal_ask_streamed_or_not(model, tmp_path):
    with Server(model, tmp_path) as server, server.http() as http:
        client = server.openai()
        context = create(http, text=TEXT_A, method="snapkv", ratio=0.5)
        assert context["id"].startswith("ctx-") and len(context["id"]) == 36
        assert context["tokens"] > 300 and context["bytes_held"] < 0.55 * context["bytes_full"]
        assert context["method"] == "snapkv" and context["ratio"] == 0.5 and context["expires_at"] is None
        expected = reference(model, TEXT_A, "Who keeps the lighthouse?", kvsqueeze.SnapKV(ratio=0.5),
                             max_new_tokens=16)

        answer = ask(client, context["id"], "Who keeps the lighthouse?", max_tokens=16, temperature=0)
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason in ("length", "stop")
        question_tokens = tokenizer()("\n\nWho keeps the lighthouse?<|im_end|>\n<|im_start|>assistant\n",
                                      add_special_tokens=False).input_ids
        assert answer.usage.prompt_tokens == context["tokens"] + len(question_tokens)
        assert answer.usage.prompt_tokens_details.cached_tokens == context["tokens"]
        assert 1 <= answer.usage.completion_tokens <= 16

        text, chunks = streamed(client, context["id"], "Who keeps the lighthouse?", max_tokens=16,
                                stream_options={"include_usage": True})
        assert text == expected
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
        assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

        plain = ask(client, None, "Say hello.", max_tokens=5)  # no context: a plain chat completion
        assert plain.usage.prompt_tokens_details.cached_tokens == 0 and plain.usage.completion_tokens <= 5


def test_messages_context_and_quantizer(model, tmp_path):
    """A context given as messages (system prompt + the user turn holding the document), stored with KIVI-4."""
    with Server(model, tmp_path) as server, server.http() as http:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": TEXT_B}]
        context = create(http, messages=messages, method="none", quantizer="kivi-4")
        assert context["method"] == "none" and context["quantizer"] == "kivi-4"
        assert context["bytes_held"] < 0.7 * context["bytes_full"]  # the last 128 tokens stay in full precision
        answer = ask(server.openai(), context["id"], "What is it about?", max_tokens=8)
        ids = tokenizer().apply_chat_template([messages[0], {"role": "user", "content": TEXT_B + "@@"}],
                                              tokenize=False).split("@@")[0]
        ctx = kvsqueeze.compress(model, tokenizer(), tokenizer()(ids, add_special_tokens=False, return_tensors="pt")
                                 .input_ids, quantizer="kivi-4")
        assert answer.choices[0].message.content == ctx.ask("What is it about?", max_new_tokens=8)


def test_questions_arriving_together_share_one_generate(model, tmp_path):
    """Questions on the same and on different contexts run as the rows of one batched generate (streamed ones
    too), each answered as its context alone answers; contexts that cannot share a batch fall back to one batch
    each. The model is only ever used by one thread, never by two at once."""
    threads, busy = set(), []
    forward = model.forward

    @functools.wraps(forward)  # generate reads the forward's signature
    def watched(*args, **kwargs):
        threads.add(threading.get_ident())
        busy.append(1)
        assert len(busy) == 1, "the model was used by two threads at once"
        try:
            return forward(*args, **kwargs)
        finally:
            busy.pop()

    model.forward = watched
    try:
        with Server(model, tmp_path, batch_window=0.5) as server, server.http() as http:
            batches = []
            server.service.batcher.on_batch = lambda rows, tokens, seconds: batches.append(rows)
            a = create(http, text=TEXT_A, method="snapkv", ratio=0.5)["id"]
            b = create(http, text=TEXT_B, method="knorm", ratio=0.25)["id"]
            c = create(http, text=TEXT_C, method="none", quantizer="kivi-4")["id"]
            client = server.openai()
            jobs = [(a, "Who?", 6, False), (a, "Where is the lighthouse?", 9, True), (b, "When?", 7, False),
                    (b, "Why?", 5, True), (a, "What is the recipe?", 8, False)]
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(lambda job: streamed(client, job[0], job[1], max_tokens=job[2])[0] if job[3]
                                        else ask(client, job[0], job[1], max_tokens=job[2]).choices[0].message.content,
                                        jobs))
            until(lambda: batches)  # the batch is counted after its rows have answered
            assert batches == [len(jobs)]
            with ThreadPoolExecutor(2) as pool:  # KIVI-4 and full-precision caches cannot be stacked
                mixed = list(pool.map(lambda job: ask(client, job[0], job[1], max_tokens=6).choices[0].message.content,
                                      [(a, "Who?"), (c, "Who?")]))
            until(lambda: len(batches) == 3)
            assert sorted(batches[1:]) == [1, 1]
    finally:
        model.forward = forward
    assert len(threads) == 1 and threading.get_ident() not in threads
    contexts = {a: (TEXT_A, kvsqueeze.SnapKV(ratio=0.5), None), b: (TEXT_B, kvsqueeze.KNorm(ratio=0.25), None),
                c: (TEXT_C, None, "kivi-4")}
    got = []
    for (id, question, limit, _), answer in zip(jobs + [(a, "Who?", 6, 0), (c, "Who?", 6, 0)], answers + mixed):
        text, method, quantizer = contexts[id]
        got.append((answer, reference(model, text, question, method, quantizer, max_new_tokens=limit)))
    assert [answer for answer, _ in got] == [expected for _, expected in got]


def test_stop_strings_sampling_and_seed(model, tmp_path):
    with Server(model, tmp_path) as server, server.http() as http:
        client = server.openai()
        id = create(http, text=TEXT_A)["id"]
        full = ask(client, id, "Who?", max_tokens=12).choices[0].message.content
        words = full.split()
        stop = words[len(words) // 2]
        cut = ask(client, id, "Who?", max_tokens=12, stop=[stop, "never-there"])
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == full[:full.index(stop)].strip()
        text, chunks = streamed(client, id, "Who?", max_tokens=12, stop=stop)
        assert text == cut.choices[0].message.content and chunks[-1].choices[0].finish_reason == "stop"

        first = ask(client, id, "Who?", max_tokens=8, temperature=1.0, seed=7).choices[0].message.content
        again = ask(client, id, "Who?", max_tokens=8, temperature=1.0, seed=7).choices[0].message.content
        assert first == again
        assert ask(client, id, "Who?", max_tokens=8, temperature=0.7, top_p=0.9).usage.completion_tokens <= 8


def test_contexts_listed_read_and_deleted_and_the_metrics(model, tmp_path):
    with Server(model, tmp_path) as server, server.http() as http:
        first, second = create(http, text=TEXT_A), create(http, text=TEXT_B, ttl_seconds=3600)
        assert second["expires_at"] >= second["created_at"] + 3599
        assert [c["id"] for c in http.get("/v1/contexts").json()["data"]] == [first["id"], second["id"]]
        assert http.get(f"/v1/contexts/{first['id']}").json() == first
        assert http.delete(f"/v1/contexts/{first['id']}").json()["deleted"] is True
        assert http.get(f"/v1/contexts/{first['id']}").status_code == 404
        assert not (tmp_path / "contexts" / f"{first['id']}.safetensors").exists()
        ask(server.openai(), second["id"], "Who?", max_tokens=3)
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert http.get("/health").json()["status"] == "ok"
        deadline = time.monotonic() + 10  # a batch is counted when its generate returns, which can follow the answer
        counted = "kvsqueeze_batch_rows_count 1.0"
        while counted not in (metrics := http.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.05)
        for line in ['kvsqueeze_requests_total{route="POST /v1/chat/completions",status="200"} 1.0',
                     "kvsqueeze_contexts 1.0", f"kvsqueeze_context_bytes_held {second['bytes_held']}.0",
                     f"kvsqueeze_context_bytes_saved {second['bytes_full'] - second['bytes_held']}.0",
                     f"kvsqueeze_context_bytes_on_disk {second['bytes_on_disk']}.0",
                     "kvsqueeze_batch_rows_count 1.0", 'kvsqueeze_request_seconds_count{route="POST /v1/contexts"} 2.0']:
            assert line in metrics, line


def test_restart_keeps_every_unexpired_context_and_skips_damaged_files(model, tmp_path):
    with Server(model, tmp_path) as server, server.http() as http:
        kept, truncated, altered = (create(http, text=text)["id"] for text in (TEXT_A, TEXT_B, TEXT_C))
        expiring = create(http, text=TEXT_A, ttl_seconds=0.5)["id"]
        before = ask(server.openai(), kept, "Who?", max_tokens=8).choices[0].message.content
    files = tmp_path / "contexts"
    data = (files / f"{truncated}.safetensors").read_bytes()
    (files / f"{truncated}.safetensors").write_bytes(data[:len(data) // 2])
    data = bytearray((files / f"{altered}.safetensors").read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in a tensor: the header still reads, the digest does not match
    (files / f"{altered}.safetensors").write_bytes(bytes(data))
    time.sleep(0.6)

    with Server(model, tmp_path, memory_budget=0) as server, server.http() as http:
        listed = [c["id"] for c in http.get("/v1/contexts").json()["data"]]
        assert listed == [kept, altered]  # truncated: reported and skipped; expired: removed
        assert not (files / f"{expiring}.safetensors").exists()
        assert (tmp_path / "corrupt" / f"{truncated}.safetensors").exists()
        assert http.get("/health").json()["skipped_files"] == 1
        assert any(truncated in problem for problem in server.service.store.problems)
        client = server.openai()
        assert ask(client, kept, "Who?", max_tokens=8).choices[0].message.content == before
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client, altered, "Who?", max_tokens=8)
        assert caught.value.status_code == 410 and caught.value.body["code"] == "context_unreadable"
        assert [c["id"] for c in http.get("/v1/contexts").json()["data"]] == [kept]
        assert ask(client, kept, "Who?", max_tokens=8).choices[0].message.content == before  # still serving
        assert "kvsqueeze_context_files_skipped 2.0" in http.get("/metrics").text


def test_memory_budget_keeps_the_most_recently_used(model, tmp_path):
    with Server(model, tmp_path) as server, server.http() as http:
        ids = [create(http, text=text)["id"] for text in (TEXT_A, TEXT_B)]
        sizes = {c["id"]: c["bytes_held"] for c in http.get("/v1/contexts").json()["data"]}
    with Server(model, tmp_path, memory_budget=max(sizes.values()) + 1) as server:
        store, client = server.service.store, server.openai()
        assert store.in_memory() == []
        for id in ids + [ids[0]]:
            ask(client, id, "Who?", max_tokens=2)
            assert store.in_memory() == [id]  # read back from disk; the other one dropped


def test_keys_and_ownership(model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_API_KEYS", "")
    with Server(model, tmp_path, api_keys=["key-one", "key-two"]) as server:
        anonymous, one, two, wrong = server.http(), server.http("key-one"), server.http("key-two"), server.http("nope")
        assert anonymous.get("/health").status_code == 200
        for client in (anonymous, wrong):
            for method, path in [("GET", "/v1/models"), ("GET", "/v1/contexts"), ("POST", "/v1/contexts"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("GET", "/no/such/route")]:
                response = client.request(method, path, json={})
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            ask(server.openai("nope"), None, "Hi", max_tokens=2)
        mine = create(one, text=TEXT_A)["id"]
        for response in (two.get(f"/v1/contexts/{mine}"), two.delete(f"/v1/contexts/{mine}")):
            assert response.status_code == 404  # not 403: another key cannot tell that it exists
        assert two.get("/v1/contexts").json()["data"] == []
        with pytest.raises(openai.NotFoundError):
            ask(server.openai("key-two"), mine, "Who?", max_tokens=2)
        assert ask(server.openai("key-one"), mine, "Who?", max_tokens=2).usage.completion_tokens <= 2
        assert [c["id"] for c in one.get("/v1/contexts").json()["data"]] == [mine]
        owner = server.service.store.get(mine, server.service.auth.owner("Bearer key-one")).owner
        assert "key-one" not in owner and len(owner) > 20  # a digest of the key is stored, not the key


def test_every_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(model, tmp_path):
    with Server(model, tmp_path, max_body_bytes=20_000, max_tokens=64, max_contexts_per_key=2) as server, \
            server.http() as http:
        good = create(http, text=TEXT_A)["id"]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Who?"}], "context_id": good}
        cases = [
            ("POST", "/v1/contexts", b"{not json", 400, None),
            ("POST", "/v1/contexts", {"text": "x", "method": "no_such_method"}, 400, "method"),
            ("POST", "/v1/contexts", {"text": "x", "method": "snapkv", "ratio": 1.0}, 400, "ratio"),
            ("POST", "/v1/contexts", {"text": "x", "method": "snapkv", "ratio": -0.1}, 400, "ratio"),
            ("POST", "/v1/contexts", {"text": "x", "method": "think", "ratio": 0.5}, 400, "ratio"),  # takes none
            ("POST", "/v1/contexts", {"text": "x", "quantizer": "kivi-x"}, 400, "quantizer"),
            ("POST", "/v1/contexts", {"text": "x", "chunk_size": 1}, 400, "chunk_size"),
            ("POST", "/v1/contexts", {"text": "x", "ttl_seconds": 0}, 400, "ttl_seconds"),
            ("POST", "/v1/contexts", {}, 400, None),
            ("POST", "/v1/contexts", {"text": "x", "messages": [{"role": "user", "content": "y"}]}, 400, None),
            ("POST", "/v1/contexts", {"text": "   "}, 400, None),
            ("POST", "/v1/contexts", {"text": "x", "colour": "blue"}, 400, "colour"),
            ("POST", "/v1/contexts", {"messages": [{"role": "assistant", "content": "y"}]}, 400, "messages"),
            ("POST", "/v1/contexts", {"text": "word " * 1100}, 400, "text"),  # over the model's 1024 tokens
            ("POST", "/v1/contexts", {"text": "x" * 30_000}, 413, None),
            ("GET", "/v1/contexts/ctx-" + "0" * 32, None, 404, "context_id"),
            ("GET", "/v1/contexts/..%2F..%2Findex.sqlite3", None, 404, None),
            ("DELETE", "/v1/contexts/" + good.upper(), None, 404, "context_id"),
            ("POST", "/v1/chat/completions", chat | {"context_id": "ctx-" + "1" * 32}, 404, "context_id"),
            ("POST", "/v1/chat/completions", chat | {"context_id": "../index.sqlite3"}, 404, "context_id"),
            ("POST", "/v1/chat/completions", chat | {"model": "gpt-4o"}, 404, "model"),
            ("POST", "/v1/chat/completions", chat | {"max_tokens": 65}, 400, "max_tokens"),
            ("POST", "/v1/chat/completions", chat | {"max_tokens": 0}, 400, "max_tokens"),
            ("POST", "/v1/chat/completions", chat | {"temperature": 3}, 400, "temperature"),
            ("POST", "/v1/chat/completions", chat | {"n": 2}, 400, "n"),
            ("POST", "/v1/chat/completions", chat | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
            ("POST", "/v1/chat/completions", chat | {"messages": []}, 400, "messages"),
            ("POST", "/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "a"}] * 2}, 400,
             "messages"),
            ("POST", "/v1/chat/completions", chat | {"messages": [{"role": "wizard", "content": "a"}]}, 400, None),
            ("POST", "/v1/chat/completions", chat | {"frequency_penalty": 1.5}, 400, "frequency_penalty"),
            ("POST", "/v1/chat/completions", {"messages": chat["messages"]}, 400, "model"),
            ("POST", "/v1/no/such/route", {}, 404, None),
        ]
        for method, path, body, status, param in cases:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            response = http.request(method, path, headers={"Content-Type": "application/json"}, **kwargs)
            assert response.status_code == status, (path, body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"], error
            if param is not None:
                assert error["param"] is not None and error["param"].startswith(param), (body, error)
        # a body larger than the limit without a Content-Length (chunked) is refused too
        response = http.post("/v1/contexts", content=iter([b'{"text": "', b"x" * 25_000, b'"}']))
        assert response.status_code == 413
        create(http, text=TEXT_B)
        response = http.post("/v1/contexts", json={"text": TEXT_C})
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_limit_reached"
        assert len(list((tmp_path / "contexts").iterdir())) == 2
        assert ask(server.openai(), good, "Who?", max_tokens=4).usage.completion_tokens <= 4


def test_the_bundled_model_end_to_end(bundled, tmp_path):
    """The real model on the bundled document through the openai client: the fact is found, streamed or not, and
    the answers equal CompressedContext.ask on the stored context."""
    model, tok = bundled
    question = "How many bay leaves does the lighthouse keeper's secret fish stew recipe use?"
    with Server(model, tmp_path, tokenizer_=tok, model_name="smollm2") as server, server.http() as http:
        context = create(http, text=DOCUMENT)  # the server's default method at 0.5
        assert context["method"] == kvsqueeze.methods.DEFAULT and context["tokens"] > 3000
        assert context["bytes_held"] <= 0.55 * context["bytes_full"]
        client = server.openai()
        answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                max_tokens=20, extra_body={"context_id": context["id"]})
        chunks = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                max_tokens=20, extra_body={"context_id": context["id"]}, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        stored = kvsqueeze.CompressedContext.load(tmp_path / "contexts" / f"{context['id']}.safetensors", model, tok)
    expected = stored.ask(question, max_new_tokens=20)
    assert answer.choices[0].message.content == text == expected
    assert "seven" in expected.lower() or "7" in expected
