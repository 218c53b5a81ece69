"""`kvsqueeze serve`: the compressed context cache behind an OpenAI-compatible HTTP API, on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import sys
from pathlib import Path

from .. import methods
from ..models import DEFAULT_MODEL, cache_dir

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size(text: str) -> int:
    """Bytes from '4GiB', '512MB', '1.5G' or a plain number."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MB, 1000000)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvsqueeze serve",
        description="Serve compressed contexts behind an OpenAI-compatible API: POST /v1/contexts compresses a "
                    "document once, POST /v1/chat/completions with a context_id asks it questions.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: the bundled SmolLM2)")
    p.add_argument("--method", default=methods.DEFAULT,
                   help=f"method for contexts that name none (registry name, or none); default {methods.DEFAULT}")
    p.add_argument("--ratio", type=float, default=0.5, help="its ratio, the fraction of the cache removed (0.5)")
    p.add_argument("--quant", default=None, metavar="NAME-BITS", help="store contexts quantized: kivi-4, kivi-2, ...")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill contexts in chunks of this many tokens")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", type=Path, default=None, help=f"folder of stored contexts (default {cache_dir()}/serve)")
    p.add_argument("--memory-budget", type=size, default=4 * 2**30, help="bytes of contexts kept in memory (4GiB)")
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; also "
                        "KVSQUEEZE_API_KEYS=k1,k2). Without any, the server is open")
    p.add_argument("--max-body", type=size, default=8 * 2**20, help="largest request body (8MiB)")
    p.add_argument("--max-context-tokens", type=int, default=None,
                   help="longest context (default: the model's window; above it needs chunk_size)")
    p.add_argument("--max-tokens", type=int, default=2048, help="the most tokens a request may ask for (2048)")
    p.add_argument("--default-max-tokens", type=int, default=128, help="answer length when a request sets none")
    p.add_argument("--max-contexts-per-key", type=int, default=100)
    p.add_argument("--ttl", type=float, default=None, help="seconds a context lives unless its request says (forever)")
    p.add_argument("--max-batch", type=int, default=8, help="questions answered in one batched generate (8)")
    p.add_argument("--batch-window-ms", type=float, default=20, help="wait for more questions to batch (20 ms)")
    p.add_argument("--attn", default="sdpa", help="attention implementation")
    p.add_argument("--log-level", default="info")
    return p


def settings_from(args):
    from .auth import keys_from
    from .service import Settings

    method = None if args.method.lower() == "none" else args.method
    return Settings(store=args.store or cache_dir() / "serve", model_name=args.model, method=method,
                    ratio=args.ratio, quantizer=args.quant, chunk_size=args.chunk_size,
                    memory_budget=args.memory_budget, api_keys=keys_from(args.api_key), max_body_bytes=args.max_body,
                    max_context_tokens=args.max_context_tokens, max_tokens=args.max_tokens,
                    default_max_tokens=args.default_max_tokens, max_contexts_per_key=args.max_contexts_per_key,
                    default_ttl=args.ttl, max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000)


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from .app import create_app
        from .service import Service
    except ImportError as error:
        print(f"kvsqueeze serve needs its extra: pip install 'kvsqueeze[serve]' ({error})", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kvsqueeze.serve")
    settings = settings_from(args)
    if not settings.api_keys and not loopback(args.host):
        log.warning("serving on %s with no API key: anyone who can reach it can use it (give --api-key)", args.host)
    from .. import models

    model, tokenizer = models.load(args.model, attn_implementation=args.attn)
    service = Service(model, tokenizer, settings)
    log.info("serving %s on http://%s:%d, contexts in %s", args.model, args.host, args.port, settings.store)
    # uvicorn ends the process with the signal that stopped it, after the app's shutdown has closed the service
    uvicorn.run(create_app(service, close_service=True), host=args.host, port=args.port,
                log_level=args.log_level.lower())
    return 0
