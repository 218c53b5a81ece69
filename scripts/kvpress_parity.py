"""Compare the tokens kvsqueeze's methods keep with those of NVIDIA kvpress's scorer presses.

Dev check, not part of the package or the tests (kvpress lives in its own environment, made by
../shared/tools/kvpress_reference.py). Runs each pair on the bundled model over the same text and
prints, per method, the fraction of (layer, head) whose kept sets are identical and the mean overlap.

    python scripts/kvpress_parity.py [--text-file doc.txt] [--ratio 0.5]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze.cache import EvictingLayer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "kvpress_reference.py"

# kvsqueeze method -> (kvpress press, kvpress kwargs, needs eager attention)
PAIRS = {
    "knorm": (kvsqueeze.KNorm, {}, "KnormPress", {}, False),
    "streaming_llm": (kvsqueeze.StreamingLLM, {}, "StreamingLLMPress", {}, False),
    "snapkv (kvpress settings)": (kvsqueeze.SnapKV, {"window_size": 64, "kernel_size": 5, "pooling": "avg"},
                                  "SnapKVPress", {}, False),
    "tova": (kvsqueeze.TOVA, {}, "TOVAPress", {}, False),
    "keydiff": (kvsqueeze.KeyDiff, {}, "KeyDiffPress", {}, False),
    "expected_attention": (kvsqueeze.ExpectedAttention, {}, "ExpectedAttentionPress", {}, False),
    "observed_attention": (kvsqueeze.ObservedAttention, {}, "ObservedAttentionPress", {}, True),
    "lagkv": (kvsqueeze.LagKV, {}, "LagKVPress", {}, False),
    "cap": (kvsqueeze.Cap, {}, "CapPress", {}, False),
    "cur": (kvsqueeze.CUR, {}, "CURPress", {}, False),
    "non_causal_attention": (kvsqueeze.NonCausalAttention, {}, "NonCausalAttnPress", {}, False),
}


def kept_by_kvsqueeze(model, ids, method):
    kept = {}
    original = EvictingLayer.keep

    def recording_keep(layer, mask, keys=None, values=None):
        index = next(i for i, l in enumerate(cache_layers) if l is layer)
        kept[index] = [row.nonzero().flatten().tolist() for row in mask[0]]
        return original(layer, mask, keys, values)

    EvictingLayer.keep = recording_keep
    try:
        cache = kvsqueeze.SqueezeCache(model.config)
        cache_layers = cache.layers
        kvsqueeze.pipeline.prefill(model, ids, cache, method)
    finally:
        EvictingLayer.keep = original
    return kept


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", default=str(Path(kvsqueeze.__file__).parent / "data" / "document.txt"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--only", help="comma-separated subset of the pairs")
    args = parser.parse_args()
    text = Path(args.text_file).read_text()
    print(f"| kvsqueeze method | kvpress press | heads identical | mean overlap |")
    print(f"|---|---|---|---|")
    for label, (cls, kwargs, press, press_kwargs, eager) in PAIRS.items():
        if args.only and label.split()[0] not in args.only.split(","):
            continue
        command = [sys.executable, str(REFERENCE), "--press", press, "--ratio", str(args.ratio),
                   "--text-file", args.text_file, "--kwargs", json.dumps(press_kwargs)] + (["--eager"] if eager else [])
        reference = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["kept"]
        model, tokenizer = kvsqueeze.load(attn_implementation="eager" if eager else "sdpa")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        ours = kept_by_kvsqueeze(model, ids, cls(ratio=args.ratio, **kwargs))
        identical, overlaps = 0, []
        for layer, heads in reference.items():
            for head, ref in enumerate(heads):
                mine = set(ours[int(layer)][head])
                identical += mine == set(ref)
                overlaps.append(len(mine & set(ref)) / max(len(ref), 1))
        print(f"| {label} | {press} | {identical}/{len(overlaps)} | {sum(overlaps) / len(overlaps):.4f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
