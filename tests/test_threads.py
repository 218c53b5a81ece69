"""One model shared by threads: each thread gets exactly what it gets alone, whatever the other runs."""

import threading

import pytest
import torch

import kvsqueeze
from conftest import random_ids, tiny_model

PAIRS = [  # (method, quantizer) in thread A, in thread B
    ((lambda: kvsqueeze.KNorm(ratio=0.75), None), (lambda: None, None)),
    ((lambda: kvsqueeze.KNorm(ratio=0.75), None), (lambda: kvsqueeze.SnapKV(ratio=0.5), None)),
    ((lambda: kvsqueeze.AdaKV(ratio=0.5), None), (lambda: None, "kivi-4")),
    ((lambda: kvsqueeze.H2O(budget=24), None), (lambda: kvsqueeze.Quest(budget=16, page_size=4), None)),
]


def run(model, context, setup):
    """Compress, ask, and generate under a decode method: what a thread sees."""
    method, quantizer = setup[0](), setup[1]
    decode = method if method is not None and method.phase != "prefill" else None
    ctx = kvsqueeze.compress(model, None, context, None if decode else method, quantizer=quantizer)
    answer = ctx.generate(random_ids(4, seed=7), decode, max_new_tokens=6)
    with (method or kvsqueeze.KNorm(ratio=0.0)).apply(model):
        out = model(context, use_cache=True).logits
    return ctx.nbytes(), [k.tolist() for k in ctx.cache.kept_per_head()], answer.tolist(), out


@pytest.mark.parametrize("a, b", PAIRS)
def test_two_threads_get_what_each_gets_alone(a, b):
    model = tiny_model()
    contexts = random_ids(60, seed=1), random_ids(70, seed=2)
    alone = [run(model, context, setup) for context, setup in zip(contexts, (a, b))]
    for _ in range(4):
        results, errors = [None, None], []
        barrier = threading.Barrier(2)

        def work(i):
            try:
                barrier.wait()
                for _ in range(3):  # overlapping every phase of the other thread's work
                    results[i] = run(model, contexts[i], (a, b)[i])
            except BaseException as error:  # noqa: BLE001  re-raised below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for got, expected in zip(results, alone):
            assert got[:3] == expected[:3]
            assert torch.equal(got[3], expected[3])
    assert model.config._attn_implementation == "sdpa" and not model.model._forward_pre_hooks
