"""Freed means returned: the process memory (RSS) a context holds and gives back, for a full and a compressed one.

Each configuration runs in a fresh process: load the bundled model, compress a ~3,000-token needle haystack
with the method (which returns what it evicted: `compress` ends with `kvsqueeze.release_freed_memory`), measure
RSS, `del` the context (and collect), measure RSS again, with or without calling `release_freed_memory` after the
`del`. Without it glibc keeps much of what was freed in its heap for reuse; with it, RSS drops by about the
cache's bytes, so a compressed context's saving is memory really returned.

    python benchmarks/rss_release.py --tokens 3000 --methods none,knorm,adakv
"""

import argparse
import gc
import json
import subprocess
import sys

import torch

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample

MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(method: str, tokens: int, release: bool) -> dict:
    model, tokenizer = kvsqueeze.load()
    context = needle_sample(tokenizer, tokens, 0.5, seed=0).context
    kvsqueeze.compress(model, tokenizer, context[:2000])  # warm up: weights, kernels, first allocations
    gc.collect()
    start = rss()
    with torch.no_grad():
        ctx = kvsqueeze.compress(model, tokenizer, context, None if method == "none" else method)
    held = ctx.nbytes()
    gc.collect()
    before = rss()
    del ctx
    gc.collect()
    if release:
        kvsqueeze.release_freed_memory()
    after = rss()
    return {"method": method, "release": release, "cache_mib": round(held / MIB, 1),
            "rss_with_context_mib": round((before - start) / MIB, 1),
            "freed_rss_mib": round((before - after) / MIB, 1), "rss_after_mib": round(after / MIB, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--methods", default="none,knorm,adakv")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "RELEASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a single measurement, in this fresh process
        print(json.dumps(measure(args.one[0], args.tokens, args.one[1] == "1")), flush=True)
        return
    for release in (False, True):
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--one", method,
                                  "1" if release else "0"], capture_output=True, text=True, check=True)
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
