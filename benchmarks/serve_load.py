"""Load on `kvsqueeze serve` through real HTTP (the `openai` client): 1, 4 and 8 concurrent clients asking questions
on 4 stored contexts of about 3,000 tokens each (the bundled document and three parts of the bundled essays), on
the bundled model. Reports requests/s, p50/p95 latency and generated tokens/s per level, then sends 500 more
requests at the highest level while sampling the server's resident memory (RSS), to show that it stays flat.

The server runs in its own process, started here with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every
allocation above 64 KiB (all tensors of any size) with mmap and returns it on free, instead of raising its
threshold as it goes and keeping freed arenas. The RSS then follows the memory really in use, which is what a
leak check must read. (Without it, RSS climbs in steps during warm-up and plateaus: fragmentation, not a leak.)

    .venv/bin/python benchmarks/serve_load.py                        # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/serve_load.py --clients 1,8 --soak 0 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

import httpx
import openai

QUESTIONS = ["What is this text mainly about?", "Name one person or thing the text mentions.",
             "Summarise the first paragraph in one sentence.", "What happens at the end?",
             "Which detail surprised you most?", "Give one number that appears in the text."]


def documents(count: int = 4, chars: int = 15_000) -> list[str]:
    """The bundled document, then parts of the bundled essays cut at paragraphs, about 3,000 tokens each."""
    data = files("kvsqueeze").joinpath("data")
    texts = [data.joinpath("document.txt").read_text()]
    part = ""
    for paragraph in data.joinpath("essays.txt").read_text().split("\n\n"):
        if len(part) + len(paragraph) > chars and part:
            texts.append(part)
            part = ""
        part += paragraph + "\n\n"
    return texts[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_server(args, store: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "kvsqueeze.cli", "serve", "--port", str(port), "--store", store,
               "--max-batch", str(args.max_batch), "--log-level", "warning", "--method", args.method,
               "--ratio", str(args.ratio)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server stopped while starting")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def run_level(url: str, model: str, contexts: list[str], clients: int, requests: int, max_tokens: int,
              offset: int = 0) -> dict:
    """`clients` threads, each with its own openai client, sending `requests` questions in all, one after the other
    each; returns the figures."""
    latencies, tokens, errors = [], [], []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            k = i + offset
            start = time.perf_counter()
            try:
                answer = client.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0,
                    messages=[{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
                    extra_body={"context_id": contexts[k % len(contexts)]})
            except openai.OpenAIError as error:
                errors.append(repr(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(answer.usage.completion_tokens)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(wall, 1),
            "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
            "tokens_per_s": round(sum(tokens) / wall, 1), "mean_completion_tokens": round(statistics.mean(tokens), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=6, help="questions each client sends per level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--soak", type=int, default=500, help="requests sent at the highest level while RSS is read")
    parser.add_argument("--soak-max-tokens", type=int, default=8, help="answer length during the soak (shorter: "
                        "the soak is about memory)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--method", default="streaming_llm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as store:
        process, url = start_server(args, store)
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            contexts = []
            for text in documents():
                context = httpx.post(url + "/v1/contexts", json={"text": text}, timeout=600).json()
                contexts.append(context["id"])
                print(f"context {context['id']}: {context['tokens']} tokens, {context['bytes_held'] / 2**20:.1f} MiB "
                      f"held of {context['bytes_full'] / 2**20:.1f} MiB ({context['method']} {context['ratio']})",
                      flush=True)
            run_level(url, model, contexts, 4, 8, args.max_tokens)  # warm-up: every context used once
            results = []
            levels = [int(c) for c in args.clients.split(",")]
            for clients in levels:
                requests = max(args.min_requests, clients * args.requests_per_client)
                results.append(run_level(url, model, contexts, clients, requests, args.max_tokens))
                print(json.dumps(results[-1]), flush=True)
            figures = {"levels": results, "server": "kvsqueeze serve, bundled SmolLM2-135M-Instruct (float32), "
                                                    f"{args.method} {args.ratio}, max_tokens {args.max_tokens}, "
                                                    f"greedy, --max-batch {args.max_batch}",
                       "cpus": os.cpu_count()}
            if len(results) > 1:
                figures["speedup"] = round(results[-1]["requests_per_s"] / results[0]["requests_per_s"], 2)
                print(f"throughput at {levels[-1]} clients / at {levels[0]}: {figures['speedup']}x", flush=True)
            if args.soak:
                samples, stop = [], threading.Event()
                done = [0]

                def sample():
                    while not stop.wait(1.0):
                        samples.append((done[0], rss(process.pid)))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                memory = [("before", rss(process.pid))]
                step = 50
                for start in range(0, args.soak, step):
                    run_level(url, model, contexts, levels[-1], step, args.soak_max_tokens, offset=start)
                    done[0] = start + step
                    memory.append((done[0], rss(process.pid)))
                    print(f"after {done[0]} requests: RSS {memory[-1][1] / 2**20:.0f} MiB", flush=True)
                stop.set()
                after = [m for n, m in memory[1:]]
                figures["soak"] = {"requests": args.soak, "clients": levels[-1], "max_tokens": args.soak_max_tokens,
                                   "rss_mib": {str(n): round(m / 2**20, 1) for n, m in memory},
                                   "growth_from_100_to_end_mib": round((after[-1] - after[1]) / 2**20, 1)
                                   if len(after) > 1 else None,
                                   "max_sampled_mib": round(max(m for _, m in samples) / 2**20, 1) if samples else None}
                print(json.dumps(figures["soak"]), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(figures, indent=2))
        finally:
            process.terminate()
            process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
