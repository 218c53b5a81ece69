"""Peak memory, prefill time and decoding speed against context length: full cache, compression during a
full prefill, and chunked prefill with in-loop compression.

Every (length, configuration) runs in its own process, so the peak resident memory (VmHWM, reset with
/proc/self/clear_refs once the model is loaded) is that configuration's alone; the figure reported is
the peak minus the memory held before the context (model, libraries). Configurations alternate within
each length, so they see the same machine load. Contexts beyond the model's window are allowed: this
measures memory and time, not answers. Writes JSON lines and a plot.

The measuring processes run with MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB (every configuration alike): glibc
then serves every tensor from its own mapping and returns it to the system when freed, so the resident
peak follows the live tensors instead of the allocator's history (by default glibc raises that threshold
after frees, and a compressing cache, which frees and allocates every layer at every chunk, fragments).

    python benchmarks/long_context.py --lengths 1024,2048,4096,8192,16384,32768 --ratio 0.75 --chunk 2048
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = ("full", "after_prefill", "chunked")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def context_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    import kvsqueeze

    text = (Path(kvsqueeze.__file__).parent / "data" / "document.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.repeat(n_tokens // len(ids) + 1)[:n_tokens][None]


def measure_one(length: int, config: str, method_name: str, ratio: float, chunk: int, decode_tokens: int) -> dict:
    import kvsqueeze

    model, tokenizer = kvsqueeze.load()
    ids = context_ids(tokenizer, length)
    question = tokenizer("\n\nWhat is this text about?", add_special_tokens=False, return_tensors="pt").input_ids
    kvsqueeze.compress(model, None, ids[:, :64], None)  # warm-up: first-call allocations are not the context's
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline = rss_kib("VmRSS")
    method = None if config == "full" else kvsqueeze.method(method_name, ratio=ratio)
    ctx = kvsqueeze.compress(model, None, ids, method, chunk_size=chunk if config == "chunked" else None,
                             check_window=False)
    peak = rss_kib("VmHWM")
    timings = []
    for new in (1, 1 + decode_tokens):  # the difference is decoding alone, without the question's prefill
        start = time.perf_counter()
        ctx.generate(question, max_new_tokens=new, min_new_tokens=new)
        timings.append(time.perf_counter() - start)
    return {"length": length, "config": config, "method": method_name, "ratio": ratio,
            "chunk": chunk if config == "chunked" else None, "threads": torch.get_num_threads(),
            "peak_mib": (peak - baseline) / 1024, "prefill_s": ctx.stats.seconds,
            "decode_tok_s": decode_tokens / (timings[1] - timings[0]),
            "cache_mib": ctx.nbytes() / 2**20, "cache_peak_mib": ctx.stats.bytes_uncompressed / 2**20}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("peak_mib", "peak memory above the loaded model (MiB)"), ("prefill_s", "prefill + compression (s)"),
              ("decode_tok_s", "decoding (tokens/s)"))
    labels = {"full": "full cache", "after_prefill": "compressed during a full prefill", "chunked": "chunked prefill"}
    for axis, (key, title) in zip(axes, panels):
        for config in CONFIGS:
            points = sorted((r["length"], r[key]) for r in rows if r["config"] == config)
            if points:
                axis.plot(*zip(*points), marker="o", label=labels[config])
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    first = rows[0]
    figure.suptitle(f"bundled SmolLM2-135M, CPU, {first['method']} at ratio {first['ratio']}, "
                    f"chunks of {max(r['chunk'] or 0 for r in rows)} tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--method", default="knorm")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", default="results/long_context.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "length,config": measure in this process
    args = parser.parse_args()
    if args.one:
        length, config = args.one.split(",")
        print(json.dumps(measure_one(int(length), config, args.method, args.ratio, args.chunk, args.decode_tokens)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in map(int, args.lengths.split(",")):
        for config in args.configs.split(","):
            command = [sys.executable, __file__, "--one", f"{length},{config}", "--method", args.method,
                       "--ratio", str(args.ratio), "--chunk", str(args.chunk),
                       "--decode-tokens", str(args.decode_tokens)]
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{length:>6} {config:<14} peak {row['peak_mib']:8.1f} MiB  prefill {row['prefill_s']:7.2f} s  "
                  f"decode {row['decode_tok_s']:6.1f} tok/s  cache {row['cache_mib']:7.1f} MiB", flush=True)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
