"""`kvsqueeze bench`: peak memory, prefill time, decoding speed and cache bytes against context length, for the
full cache and, per method, compression during a full prefill and chunked prefill with in-loop compression.

Every (length, configuration) runs in its own process, so the peak resident memory (VmHWM, reset with
/proc/self/clear_refs once the model is loaded) is that configuration's alone; the figure reported is
the peak minus the memory held before the context (model, libraries). Configurations alternate within
each length, so they see the same machine load. Contexts beyond the model's window are allowed: this
measures memory and time, not answers. Writes JSON lines and a plot.

The measuring processes run with MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB (every configuration alike): glibc
then serves every tensor from its own mapping and returns it to the system when freed, so the resident
peak follows the live tensors instead of the allocator's history (by default glibc raises that threshold
after frees, and a compressing cache, which frees and allocates every layer at every chunk, fragments).

On CUDA the peak GPU memory (torch.cuda.max_memory_allocated, above the loaded model) is reported too.

    kvsqueeze bench --lengths 1024,2048,4096,8192,16384 --methods knorm,snapkv --ratio 0.75 --chunk 2048
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
LABELS = {"full": "full cache", "after_prefill": "compressed during a full prefill", "chunked": "chunked prefill"}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def context_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The built-in document repeated to `n_tokens` tokens."""
    text = (Path(__file__).parent / "data" / "document.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.repeat(n_tokens // len(ids) + 1)[:n_tokens][None]


def seconds_per_token(model, ctx, steps: int) -> float:
    """Seconds per decoding step on a copy of `ctx`'s cache (one warm-up step first, not timed): the model reads
    the cache as `generate` would, one token at a time."""
    from .hooks import attached
    from .models import cache_argument

    cache, token = ctx.cache.fork(), ctx.context_ids[:, -1:]
    with torch.no_grad(), attached(model):
        model(token, **{cache_argument(model): cache})
        start = time.perf_counter()
        for _ in range(steps):
            model(token, **{cache_argument(model): cache})
    return (time.perf_counter() - start) / steps


def measure_one(length: int, config: str, method_name: str | None, ratio: float, chunk: int, decode_tokens: int,
                model_name: str | None = None, quant: str | None = None) -> dict:
    """One configuration at one length, in this process: what it costs above the loaded model."""
    import kvsqueeze

    model, tokenizer = kvsqueeze.load(model_name)
    cuda = model.device.type == "cuda"
    ids = context_ids(tokenizer, length)
    question = tokenizer("\n\nWhat is this text about?", add_special_tokens=False, return_tensors="pt").input_ids
    kvsqueeze.compress(model, None, ids[:, :64], None)  # warm-up: first-call allocations are not the context's
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline = rss_kib("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    method = None if config == "full" else kvsqueeze.methods.build(method_name, ratio)
    ctx = kvsqueeze.compress(model, None, ids, method, chunk_size=chunk if config == "chunked" else None,
                             quantizer=quant, check_window=False)
    peak = rss_kib("VmHWM")
    gpu_peak = (torch.cuda.max_memory_allocated() - gpu_baseline) / 2**20 if cuda else None
    timings = []
    for new in (1, 1 + decode_tokens):  # the difference is decoding alone, without the question's prefill
        start = time.perf_counter()
        ctx.generate(question, max_new_tokens=new, min_new_tokens=new)
        timings.append(time.perf_counter() - start)
    return {"length": length, "config": config, "method": None if config == "full" else method_name,
            "ratio": None if config == "full" else ratio, "quant": quant,
            "device": torch.cuda.get_device_name() if cuda else "CPU",
            "chunk": chunk if config == "chunked" else None, "threads": torch.get_num_threads(),
            "peak_mib": (peak - baseline) / 1024, "gpu_peak_mib": gpu_peak, "prefill_s": ctx.stats.seconds,
            "decode_tok_s": decode_tokens / (timings[1] - timings[0]),
            "cache_mib": ctx.nbytes() / 2**20, "cache_peak_mib": ctx.stats.bytes_uncompressed / 2**20}


def series(row: dict) -> str:
    if row["config"] == "full":
        return LABELS["full"] + (f" + {row['quant']}" if row.get("quant") else "")
    return f"{row['method']} {row['ratio']}: {LABELS[row['config']]}" + (f" + {row['quant']}" if row.get("quant") else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = "gpu_peak_mib" if any(r.get("gpu_peak_mib") is not None for r in rows) else "peak_mib"
    panels = ((memory, f"peak {'GPU' if memory == 'gpu_peak_mib' else 'process'} memory above the model (MiB)"),
              ("cache_mib", "cache held after compression (MiB)"), ("prefill_s", "prefill + compression (s)"),
              ("decode_tok_s", "decoding (tokens/s)"))
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for axis, (key, title) in zip(axes, panels):
        for label in dict.fromkeys(series(r) for r in rows):
            points = sorted((r["length"], r[key]) for r in rows if series(r) == label)
            axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    chunks = max((r["chunk"] or 0) for r in rows)
    figure.suptitle(f"{rows[0].get('model') or 'bundled SmolLM2-135M'}, {rows[0].get('device', 'CPU')}"
                    + (f", chunks of {chunks} tokens" if chunks else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvsqueeze bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--methods", default="knorm", help="comma-separated method specs")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--quant", default="none", help="comma-separated quantizers, 'none' for none")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", default="results/bench.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "length,config,method,quant": measure in this process
    args = parser.parse_args(argv)
    if args.one:
        length, config, method, quant = args.one.split(",")
        print(json.dumps(measure_one(int(length), config, method, args.ratio, args.chunk, args.decode_tokens,
                                     args.model, None if quant == "none" else quant)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [(config, method, quant) for quant in args.quant.split(",") for config in args.configs.split(",")
            for method in (["-"] if config == "full" else args.methods.split(","))]
    rows = []
    for length in map(int, args.lengths.split(",")):
        for config, method, quant in runs:  # alternating within a length: every configuration sees the same load
            command = [sys.executable, "-m", "kvsqueeze.bench", "--one", f"{length},{config},{method},{quant}",
                       "--ratio", str(args.ratio), "--chunk", str(args.chunk), "--decode-tokens", str(args.decode_tokens)]
            if args.model:
                command += ["--model", args.model]
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"measuring {config} {method} at {length} tokens failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1]) | {"model": args.model}
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{length:>6} {series(row):<48} peak {row['peak_mib']:8.1f} MiB  prefill {row['prefill_s']:7.2f} s  "
                  f"decode {row['decode_tok_s']:6.1f} tok/s  cache {row['cache_mib']:7.1f} MiB", flush=True)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
