"""The serve store (files, index, memory budget, expiry) and the streamed text of a row, without a model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvsqueeze.serve.batcher import Generation, Row, Rows
from kvsqueeze.serve.cli import size
from kvsqueeze.serve.store import LimitError, Store, new_id, valid_id


class Context:
    """Stands in for a CompressedContext: its stats, its bytes, and a file of them."""

    def __init__(self, n: int):
        self.n = n
        self.stats = SimpleNamespace(context_tokens=n, bytes_held=n * 4, bytes_uncompressed=n * 8)

    def nbytes(self) -> int:
        return self.n * 4

    def save(self, path) -> None:
        save_file({"x": torch.zeros(self.n)}, str(path))

    @classmethod
    def load(cls, path) -> "Context":
        return cls(len(load_file(str(path))["x"]))


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(path, budget=10**9, clock=None) -> Store:
    return Store(path, "model-a", Context.load, budget, clock=clock or Clock())


def add(store, owner="alice", n=10, ttl=None, limit=None):
    context = Context(n)
    return store.add(owner, context, method="snapkv", ratio=0.5, quantizer=None, ttl_seconds=ttl,
                     write=context.save, max_per_owner=limit)


def test_ids_are_random_and_validated():
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100 and all(valid_id(id) and len(id) == 36 for id in ids)
    for bad in ["ctx-" + "0" * 31, "ctx-" + "G" * 32, "../index.sqlite3", "ctx-" + "0" * 32 + "/", None, 5, ""]:
        assert not valid_id(bad)


def test_records_owners_models_and_the_memory_budget(tmp_path):
    store = make_store(tmp_path, budget=100)  # room for two contexts of 10 tokens (40 bytes each)
    a, b, c = add(store, n=10), add(store, n=10), add(store, "bob", n=10)
    assert store.in_memory() == [b.id, c.id]  # a dropped: least recently used
    assert [r.id for r in store.list("alice")] == [a.id, b.id] and store.get(c.id, "alice") is None
    assert store.open(a).n == 10 and store.in_memory() == [c.id, a.id]  # read back, b dropped now
    assert store.usage().contexts == 3 and store.usage().bytes_held == 120 and store.usage().bytes_full == 240
    other = Store(tmp_path, "model-b", Context.load, 100)  # another model sharing the folder sees none of them
    assert other.list("alice") == [] and other.get(a.id, "alice") is None
    with pytest.raises(LimitError):
        add(store, limit=2)
    assert store.delete(a.id, "alice") and not store.delete(a.id, "alice") and not store.delete(c.id, "alice")
    assert not (tmp_path / "contexts" / f"{a.id}.safetensors").exists()
    big = add(store, n=1000)  # larger than the whole budget: stored, not kept in memory
    assert big.id not in store.in_memory() and store.open(big).n == 1000


def test_expiry_and_what_a_restart_removes_or_sets_aside(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, clock=clock)
    lasting, expiring, truncated = add(store), add(store, ttl=60), add(store)
    clock.now += 61
    assert store.get(expiring.id, "alice") is None and [r.id for r in store.list("alice")] == [lasting.id, truncated.id]
    store.close()
    files = tmp_path / "contexts"
    (files / f"{new_id()}.partial").write_bytes(b"half")
    (files / f"{new_id()}.safetensors").write_bytes((files / f"{lasting.id}.safetensors").read_bytes())  # no row
    (files / "notes.txt").write_text("not ours")
    path = files / f"{truncated.id}.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    store = make_store(tmp_path, clock=clock)
    assert [r.id for r in store.list("alice")] == [lasting.id]
    assert sorted(p.name for p in files.iterdir()) == [f"{lasting.id}.safetensors"]
    assert store.skipped == 1 and truncated.id in store.problems[0]
    assert (tmp_path / "corrupt" / f"{truncated.id}.safetensors").exists()


def test_a_failed_write_leaves_nothing(tmp_path):
    store = make_store(tmp_path)

    def write(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.add("alice", Context(3), method="none", ratio=None, quantizer=None, ttl_seconds=None, write=write)
    assert list((tmp_path / "contexts").iterdir()) == [] and store.list("alice") == []


def stream(pieces: list[str], stop=(), limit=100) -> tuple[list[str], str, str]:
    """Feed a row token by token (each token decodes to one piece): (the deltas streamed, the final text, the
    finish reason)."""
    events = []
    generation = Generation(events.append, stop=tuple(stop))
    row = Row(generation, torch.tensor([1]), limit, 1, 0)
    rows = Rows([row], SimpleNamespace(decode=lambda tokens, **_: "".join(pieces[t] for t in tokens)), eos={99})
    for token in range(len(pieces)):
        if row.done:
            break
        rows.advance(row, token)
    rows.close()
    deltas = [e.text for e in events if type(e).__name__ == "Delta"]
    finished = events[-1]
    return deltas, finished.text, finished.finish_reason


def test_streamed_pieces_add_up_to_the_answer():
    deltas, text, reason = stream(["  ", "Hello", " ", "wor", "ld", "\ufffd", "!", " \n"])
    assert "".join(deltas) == text == "Hello world\ufffd!" and reason == "length"
    assert deltas[0] == "Hello"  # leading whitespace is never sent (the answer is stripped, as ask returns it)
    deltas, text, reason = stream(["The", " answer", " is", " ##", "#", " 7", "###", " more"], stop=["###"])
    assert text == "The answer is" and "".join(deltas) == text and reason == "stop"
    deltas, text, reason = stream(["a", " b", " c", " d"], limit=2)
    assert text == "a b" == "".join(deltas) and reason == "length"


def test_sizes():
    assert size("4GiB") == 4 * 2**30 and size("512MB") == 512 * 10**6 and size("1.5k") == 1500 and size("10") == 10
    with pytest.raises(Exception):
        size("four gigs")
