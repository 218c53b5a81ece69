"""Freed means returned: the process memory (RSS) a `del` gives back, for a full and a compressed context.

Each configuration runs in a fresh process: load the bundled model, compress a ~3,000-token needle haystack
with the method, measure RSS, `del` the context (and collect), measure RSS again. Without the allocator
setting (`kvsqueeze.release_freed_memory`, glibc) the process keeps much of what it freed in its heap; with
it, RSS drops by about the cache's bytes, so a compressed context's saving is memory really returned.

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
    if release:
        kvsqueeze.release_freed_memory()
    model, tokenizer = kvsqueeze.load()
    context = needle_sample(tokenizer, tokens, 0.5, seed=0).context
    kvsqueeze.compress(model, tokenizer, context[:2000])  # warm up: weights, kernels, first allocations
    gc.collect()
    with torch.no_grad():
        ctx = kvsqueeze.compress(model, tokenizer, context, None if method == "none" else method)
    held = ctx.nbytes()
    gc.collect()
    before = rss()
    del ctx
    gc.collect()
    after = rss()
    return {"method": method, "release": release, "cache_mib": round(held / MIB, 1),
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
    main()  # each measurement sets (or not) the allocator itself, in its own process
