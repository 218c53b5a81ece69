"""Generating past the model's window with a rolling StreamingLLM: memory stays flat.

Runs `model.generate` on the bundled model under `RollingStreamingLLM` for `--factor` times the model's
window (SmolLM2: 8,192 positions), forcing every token (no early stop), and samples every
`--every` steps the bytes the cache holds, the tokens it stores, and the process's resident memory.
Writes JSON lines and a plot.

    python benchmarks/rolling_window.py --window 1024 --factor 2
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria

import kvsqueeze
from kvsqueeze.bench import rss_kib


class Sampler(StoppingCriteria):
    """Never stops generation; records the cache's size every `every` steps."""

    def __init__(self, cache, every: int):
        self.cache, self.every, self.rows, self.start = cache, every, [], time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        step = input_ids.shape[1]
        if step % self.every == 0:
            self.rows.append({"generated_positions": step, "cache_mib": self.cache.nbytes() / 2**20,
                              "stored_tokens": self.cache.layers[0].stored, "rss_mib": rss_kib("VmRSS") / 1024,
                              "seconds": time.perf_counter() - self.start})
            print(json.dumps(self.rows[-1]), flush=True)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--every", type=int, default=256)
    parser.add_argument("--out", default="results/rolling_window.jsonl")
    args = parser.parse_args()
    model, tokenizer = kvsqueeze.load()
    model_window = model.config.max_position_embeddings
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a very long story about the sea."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    new_tokens = int(args.factor * model_window)
    cache = kvsqueeze.SqueezeCache(model.config)
    sampler = Sampler(cache, args.every)
    method = kvsqueeze.RollingStreamingLLM(window=args.window, interval=args.interval)
    with torch.no_grad(), method.apply(model):
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                       stopping_criteria=[sampler], pad_token_id=tokenizer.eos_token_id)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in sampler.rows))
    settled = [r for r in sampler.rows if r["generated_positions"] > args.window + args.interval]
    summary = {"model_window": model_window, "generated": new_tokens, "cache_window": args.window,
               "cache_mib_min": min(r["cache_mib"] for r in settled), "cache_mib_max": max(r["cache_mib"] for r in settled),
               "rss_mib_first": settled[0]["rss_mib"], "rss_mib_last": settled[-1]["rss_mib"],
               "rss_mib_max": max(r["rss_mib"] for r in settled),
               "tokens_per_s": new_tokens / sampler.rows[-1]["seconds"]}
    print(json.dumps(summary, indent=1))
    plot(sampler.rows, model_window, out.with_suffix(".png"))


def plot(rows, model_window, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["generated_positions"] for r in rows]
    axis.plot(steps, [r["rss_mib"] for r in rows], label="process resident memory (MiB)")
    axis.plot(steps, [r["cache_mib"] for r in rows], label="cache bytes held (MiB)")
    axis.axvline(model_window, color="grey", linestyle="--", label="model window")
    axis.set_xlabel("tokens in the sequence")
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_title("rolling StreamingLLM on SmolLM2-135M: generating 2x the window")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
