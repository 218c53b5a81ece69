"""Freed means returned: what a context held goes back to the operating system."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_ids, tiny_model

import kvsqueeze
from kvsqueeze.context import LayerContext

SCRIPT = """
import gc, sys
sys.path.insert(0, {tests!r})
from conftest import random_ids, tiny_model
import kvsqueeze

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

model = tiny_model(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                   max_position_embeddings=8192)
kvsqueeze.compress(model, None, random_ids(1024))  # warm up
ctx = kvsqueeze.compress(model, None, random_ids(6000), {method})
held = ctx.nbytes()
gc.collect()
before = rss()
del ctx
gc.collect()
kvsqueeze.release_freed_memory()
print(held, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
@pytest.mark.parametrize("method", [None, "'knorm'", "'adakv'"])
def test_a_deleted_context_gives_its_bytes_back(method):
    code = SCRIPT.format(tests=str(Path(__file__).parent), method=method)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    held, freed = map(int, out.split()[-2:])
    assert held >= 24 * 10**6  # 6,000 tokens x 4 layers x 4 heads x 64 x 2 (keys, values) x 4 bytes, or half
    assert freed > 0.95 * held


@pytest.mark.parametrize("method", ["expected_attention", "cap", "key_rerotation", "leverage_score", "snapkv"])
def test_a_layers_context_is_freed_when_its_layer_is_done(method):
    """No reference cycle keeps a layer's queries and states alive until Python's cycle collector runs: with it
    off, no earlier layer's context is left when the next layer compresses, nor any after the prefill."""
    def alive() -> int:
        return sum(type(o) is LayerContext for o in gc.get_objects())

    model = tiny_model(num_hidden_layers=4)
    scorer = kvsqueeze.methods.build(method)
    earlier = []
    compress = scorer.compress
    scorer.compress = lambda ctx: (earlier.append(alive() - 1), compress(ctx))
    gc.collect()
    gc.disable()
    try:
        kvsqueeze.compress(model, None, random_ids(200), scorer)
        assert earlier == [0, 0, 0, 0] and alive() == 0
    finally:
        gc.enable()
