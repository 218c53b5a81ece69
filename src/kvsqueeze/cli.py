"""The `kvsqueeze` command.

    kvsqueeze                 demo: the built-in document, full cache vs the default method, side by side
    kvsqueeze ask FILE -q Q   answer a question about a file (or stdin), full vs compressed
    kvsqueeze methods         every method with what it keeps, and the quantizers
    kvsqueeze eval -b B ...   score methods on a benchmark (resumable sweep, JSON lines, table, plots)
    kvsqueeze report FILES    merge result files into one table and plots
    kvsqueeze leaderboard     every method over RULER and the needle grid, ranked, as a docs page with figures
    kvsqueeze bench           memory and speed against context length, with plots
    kvsqueeze lm-eval ARGS    lm-evaluation-harness's command line, with the "kvsqueeze" model registered
    kvsqueeze ui              a page that shows what a method kept, and the answers full vs compressed
    kvsqueeze serve           compressed contexts behind an OpenAI-compatible HTTP API (kvsqueeze serve --help)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path
import textwrap
import time
from importlib.resources import files

from . import methods as method_registry
from . import quantizers
from .models import DEFAULT_MODEL

DEFAULT_METHOD = method_registry.DEFAULT
DEMO_QUESTION = "How many bay leaves does the lighthouse keeper's secret fish stew recipe use?"


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def run(model, tokenizer, context: str, question: str, method, max_new_tokens: int, quantizer=None) -> dict:
    from .pipeline import compress

    ctx = compress(model, tokenizer, context, method, quantizer=quantizer)
    start = time.perf_counter()
    answer = ctx.ask(question, max_new_tokens=max_new_tokens)
    return {"answer": answer, "ctx": ctx, "answer_seconds": time.perf_counter() - start}


def side_by_side(question: str, runs: list[tuple[str, dict]], width: int = 38) -> str:
    """A table with one column per run: answer, cache bytes held, times."""
    full = runs[0][1]["ctx"].stats.bytes_held

    def cell_rows(result):
        stats = result["ctx"].stats
        held = megabytes(stats.bytes_held)
        if stats.bytes_held != full:
            held += f" ({100 * stats.bytes_held / full:.0f}%)"
        return {"answer": textwrap.wrap(result["answer"], width) or [""],
                "cache held": [held],
                "tokens kept": [f"{100 * (1 - stats.compression_ratio):.0f}% of {stats.context_tokens}"],
                "prefill+compress": [f"{stats.seconds:.1f} s"],
                "answer time": [f"{result['answer_seconds']:.1f} s"]}

    cells = [cell_rows(result) for _, result in runs]
    lines = [f"Question: {question}", "", f"{'':18}" + "".join(f"{title:<{width + 2}}" for title, _ in runs)]
    for row in cells[0]:
        height = max(len(c[row]) for c in cells)
        for i in range(height):
            label = row if i == 0 else ""
            lines.append(f"{label:18}" + "".join(f"{(c[row][i] if i < len(c[row]) else ''):<{width + 2}}" for c in cells))
    return "\n".join(lines)


def ask_command(args) -> int:
    from . import models

    if args.file in (None, "-"):
        if sys.stdin.isatty() and args.file is None:
            print("kvsqueeze ask: give a FILE, or pipe the context on stdin", file=sys.stderr)
            return 2
        context = sys.stdin.read()
    else:
        context = open(args.file, encoding="utf-8").read()
    method = None if args.method == "none" else method_registry.build(args.method, args.ratio, args.budget, args.param)
    quantizer = quantizers.quantizer(args.quant)
    model, tokenizer = models.load(args.model, attn_implementation=args.attn)
    runs = []
    if not args.no_full:
        runs.append(("full cache", run(model, tokenizer, context, args.question, None, args.max_new_tokens)))
    title = " + ".join(repr(part) for part in (method, quantizer) if part is not None) or "full cache"
    runs.append((title, run(model, tokenizer, context, args.question, method, args.max_new_tokens, quantizer)))
    print(side_by_side(args.question, runs))
    return 0


def demo_command(args) -> int:
    from . import models

    document = files("kvsqueeze").joinpath("data/document.txt").read_text()
    method = method_registry.build(args.method, args.ratio)
    print(f"kvsqueeze demo: the bundled SmolLM2-135M-Instruct answers a question about a built-in document,\n"
          f"first with its full KV cache, then with {method!r}.\n", flush=True)
    model, tokenizer = models.load(DEFAULT_MODEL)
    runs = [("full cache", run(model, tokenizer, document, DEMO_QUESTION, None, args.max_new_tokens)),
            (f"{method.name} ratio={method.ratio}",
             run(model, tokenizer, document, DEMO_QUESTION, method, args.max_new_tokens))]
    print(side_by_side(DEMO_QUESTION, runs))
    held = runs[1][1]["ctx"].stats.bytes_held / runs[0][1]["ctx"].stats.bytes_held
    if held > 1 - args.ratio + 0.05:
        print(f"kvsqueeze demo: FAILED: {method!r} holds {held:.0%} of the full cache, more than the "
              f"{1 - args.ratio:.0%} (+5%) a ratio of {args.ratio} should leave", file=sys.stderr)
        return 1
    return 0


def calibrate_headkv(model, tokenizer, args) -> str:
    from . import calibration
    from .head_scores import save_head_scores

    lengths = (args.tokens // 2, args.tokens)
    scores = calibration.retrieval_head_scores(model, tokenizer, samples=args.samples, lengths=lengths, seed=args.seed)
    save_head_scores(args.out, scores, model, "headkv", {"samples": args.samples, "lengths": list(lengths),
                                                         "seed": args.seed})
    return f"headkv scores for {scores.shape[0]} layers x {scores.shape[1]} KV heads"


def calibrate_duo_attention(model, tokenizer, args) -> str:
    from . import calibration
    from .head_scores import save_head_scores

    gates = calibration.duo_attention_gates(model, tokenizer, steps=args.steps, tokens=args.tokens, seed=args.seed)
    save_head_scores(args.out, gates, model, "duo_attention", {"steps": args.steps, "tokens": args.tokens,
                                                               "seed": args.seed})
    return f"duo_attention gates for {gates.shape[0]} layers x {gates.shape[1]} KV heads"


def calibration_text(args) -> tuple[str | None, dict]:
    """The local text the query statistics are collected on, and the settings that describe it."""
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else None
    return text, {"samples": args.samples, "tokens": args.tokens, "seed": args.seed,
                  "text": args.text_file or "bundled essays"}


def calibrate_qfilter(model, tokenizer, args) -> str:
    from . import calibration

    text, settings = calibration_text(args)
    filters = calibration.qfilter_filters(model, tokenizer, samples=args.samples, tokens=args.tokens, text=text,
                                          seed=args.seed)
    calibration.save_calibration(args.out, "qfilter", {"filters": filters}, model, settings)
    return f"Q-Filters for {filters.shape[0]} layers x {filters.shape[1]} KV heads"


def calibrate_expected_attention(model, tokenizer, args) -> str:
    from . import calibration

    text, settings = calibration_text(args)
    stats = calibration.expected_attention_statistics(model, tokenizer, samples=args.samples, tokens=args.tokens,
                                                      text=text, seed=args.seed)
    calibration.save_calibration(args.out, "expected_attention", stats, model, settings | {"n_sink": 4})
    return f"query mean and covariance for {stats['mean'].shape[0]} layers x {stats['mean'].shape[1]} query heads"


def calibrate_kvzap(model, tokenizer, args) -> str:
    from .methods.kvzap import train_surrogate

    text, _ = calibration_text(args)
    surrogate = train_surrogate(model, tokenizer, texts=None if text is None else [text], out=args.out,
                                samples=args.samples, tokens=args.tokens, seed=args.seed)
    return f"a KVzap surrogate ({surrogate.kind}) for {len(surrogate.layers)} layers"


def calibrate_fastkvzip(model, tokenizer, args) -> str:
    from .methods.fastkvzip import train_gates

    text, _ = calibration_text(args)
    train_gates(model, tokenizer, texts=None if text is None else [text], out=args.out, samples=args.samples,
                tokens=args.tokens, steps=args.steps, seed=args.seed)
    return "FastKVzip gates"


def calibrate_lukv(model, tokenizer, args) -> str:
    from .methods.lukv import calibrate_lukv as profile

    text, _ = calibration_text(args)
    curves = profile(model, tokenizer, path=args.out, texts=None if text is None else [text], samples=args.samples,
                     tokens=args.tokens, seed=args.seed)
    layers, heads = curves["prune_ratios"].shape[1:]
    return f"LU-KV budget curves for {layers} layers x {heads} KV heads"


def calibrate_restorekv(model, tokenizer, args) -> str:
    from .methods.restorekv import train_restore

    text, _ = calibration_text(args)
    adapter = train_restore(model, tokenizer, texts=None if text is None else [text], out=args.out,
                            samples=args.samples, tokens=args.tokens, steps=args.steps, seed=args.seed)
    return f"{adapter.n_tokens} restore tokens and a rank-{adapter.rank} adapter on {len(adapter.names)} projections"


# kind -> routine(model, tokenizer, args) that writes args.out and says what it wrote
CALIBRATIONS = {"headkv": calibrate_headkv, "duo_attention": calibrate_duo_attention, "qfilter": calibrate_qfilter,
                "expected_attention": calibrate_expected_attention, "kvzap": calibrate_kvzap,
                "lukv": calibrate_lukv, "fastkvzip": calibrate_fastkvzip, "restorekv": calibrate_restorekv}


def calibrate_command(args) -> int:
    from . import models

    model, tokenizer = models.load(args.model)
    if args.samples is None:
        args.samples = {"lukv": 3, "kvzap": 16, "fastkvzip": 16, "restorekv": 8}.get(args.kind, 12)
    if args.steps is None:
        args.steps = {"fastkvzip": 5000, "restorekv": 200}.get(args.kind, 40)
    print(f"wrote {CALIBRATIONS[args.kind](model, tokenizer, args)} to {args.out}")
    return 0


def eval_command(args) -> int:
    from . import evaluation, models

    if args.config:
        import yaml

        settings = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(settings) - set(vars(args))
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {', '.join(sorted(unknown))}")
        defaults = vars(parser().parse_args(["eval"]))
        for key, value in settings.items():  # the file sets what the command line left at its default
            if getattr(args, key) == defaults[key]:
                setattr(args, key, ",".join(map(str, value)) if isinstance(value, list) else value)
    if not args.benchmark:
        raise ValueError("give a benchmark: --benchmark NAME (or in --config); available: "
                         + ", ".join(evaluation.available()))
    lengths = [int(n) for n in str(args.length).split(",")] if args.length else None
    bench = evaluation.benchmark(args.benchmark, length=lengths[0] if lengths else None, lengths=lengths,
                                 tasks=args.tasks.split(",") if args.tasks else None, data_files=args.data_files,
                                 params=method_registry.parse_params(args.param))
    grid = evaluation.configurations(args.methods.split(","), [float(r) for r in str(args.ratios).split(",")],
                                     [None if q == "none" else q for q in args.quant.split(",")])
    for configuration in grid:  # fail now on a bad method or quantizer, not hours into the sweep
        configuration.build()
        quantizers.quantizer(configuration.quant)
    index, _, count = args.shard.partition("/")
    out = Path(args.out or f"results/eval/{args.benchmark}.jsonl")
    model, tokenizer = models.load(args.model, attn_implementation=args.attn)
    arguments = {k: v for k, v in vars(args).items() if k not in ("handler", "method", "ratio", "max_new_tokens")}
    evaluation.sweep(model, tokenizer, bench, grid, out, samples=args.samples, seed=args.seed,
                     shard=(int(index), int(count or 1)), query_aware=args.query_aware,
                     share_prefill=not args.separate_prefills, metadata=evaluation.runner.run_metadata(arguments),
                     errors="record" if args.keep_going else "raise")
    status = report(evaluation.read_results(out), out.with_suffix(".png"))
    errors = {evaluation.Configuration(*key).label: error for key, error in evaluation.runner.read_errors(out).items()}
    return failed(errors, evaluation.runner.errors_path(out)) or status


def failed(errors: dict[str, str], where: Path) -> int:
    """Say which configurations raised (they have no rows); 1 if any did."""
    for label, error in sorted(errors.items()):
        print(f"kvsqueeze: {label} failed: {error}", file=sys.stderr)
    if errors:
        print(f"kvsqueeze: {len(errors)} configuration(s) failed (their errors: {where}); run again to retry them",
              file=sys.stderr)
    return 1 if errors else 0


def leaderboard_command(args) -> int:
    from . import models
    from .evaluation import leaderboard

    settings = leaderboard.Settings(
        ratios=[float(r) for r in args.ratios.split(",")],
        quantizers=[q for q in args.quant.split(",") if q != "none"],
        combined=[m for m in args.combined.split(",") if m], ruler_length=args.ruler_length,
        ruler_samples=args.ruler_samples, ruler_tasks=args.ruler_tasks.split(",") if args.ruler_tasks else None,
        needle_lengths=[int(n) for n in args.needle_lengths.split(",")],
        needle_depths=args.needle_depths, methods=args.methods.split(",") if args.methods else None,
        bundled=args.model is None)
    if not args.page_only:
        index, _, count = args.shard.partition("/")
        model, tokenizer = models.load(args.model)
        leaderboard.run(model, tokenizer, settings, args.out, shard=(int(index), int(count or 1)))
    page = leaderboard.write_page(args.out, args.page, readme=args.readme)
    print(f"wrote {page} and its figures")
    return failed(leaderboard.failures(args.out), Path(args.out))


def report(rows: list[dict], plot_path: Path) -> int:
    from .evaluation import bucket_table, markdown_table, plots

    if not rows:
        print("no results")
        return 1
    print(markdown_table(rows))
    if buckets := bucket_table(rows):
        print("\naverage over tasks by length bucket:\n" + buckets)
    print(f"wrote {plots.plot_scores(rows, plot_path)}")
    if any(row["benchmark"] == "needle" for row in rows):
        print(f"wrote {plots.needle_heatmaps(rows, plot_path.with_name(plot_path.stem + '_heatmap.png'))}")
    return 0


def report_command(args) -> int:
    from .evaluation import read_results

    return report(read_results(*args.files), Path(args.plot or Path(args.files[0]).with_suffix(".png")))


def methods_command(args) -> int:
    registry = method_registry.available()
    width = max(map(len, registry))
    for name, cls in registry.items():
        print(f"{name:<{width}}  {cls.__name__:<18} {cls.summary()}")
        settings = ", ".join(f"{f.name}={'(required)' if f.default is dataclasses.MISSING else repr(f.default)}"
                             for f in dataclasses.fields(cls))
        print(f"{'':<{width}}  {'':<18} settings: {settings or '(none)'}")
    print("\nquantizers (--quant NAME-BITS, e.g. kivi-2; composes with any method):")
    for name, cls in sorted(quantizers.REGISTRY.items()):
        print(f"{name:<{width}}  {cls.__name__:<18} {inspect.getdoc(cls).splitlines()[0]}")
    return 0


def ui_command(args) -> int:
    try:
        from .ui import serve
    except ModuleNotFoundError as missing:
        print(f"kvsqueeze ui: {missing.name} is not installed: pip install 'kvsqueeze[ui]'", file=sys.stderr)
        return 2
    serve(args.host, args.port, args.model)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kvsqueeze", description="Compress the KV cache of a Hugging Face causal LM. "
                                  "With no command: a demo on the bundled model and a built-in document.")
    top.add_argument("--method", default=DEFAULT_METHOD, help=f"method for the demo (default {DEFAULT_METHOD})")
    top.add_argument("--ratio", type=float, default=0.5, help="fraction of the context's cache removed (demo)")
    top.add_argument("--max-new-tokens", type=int, default=40)
    commands = top.add_subparsers(dest="command", metavar="COMMAND")

    ask = commands.add_parser("ask", help="answer a question about a document, full vs compressed",
                              description="Compress a document's KV cache and answer a question about it; prints "
                                          "the answers and the memory held and time taken, full vs compressed.")
    ask.add_argument("file", nargs="?", help="the document (default: stdin)")
    ask.add_argument("-q", "--question", required=True)
    ask.add_argument("-m", "--method", default=DEFAULT_METHOD,
                     help="registry name (see `kvsqueeze methods`), or none (with --quant: quantization alone)")
    ask.add_argument("--quant", default=None, metavar="NAME-BITS",
                     help="store the kept tokens quantized: kivi-2, kivi-4, kvquant-4, gear-4 ... (any method)")
    budget = ask.add_mutually_exclusive_group()
    budget.add_argument("-r", "--ratio", type=float, help="fraction removed, in [0, 1) (default 0.5)")
    budget.add_argument("-b", "--budget", type=int, help="tokens kept per head instead of a ratio")
    ask.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                     help="a method parameter, e.g. -p window_size=64 -p head_scores=heads.json (repeatable)")
    ask.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    ask.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--no-full", action="store_true", help="skip the full-cache run")
    ask.set_defaults(handler=ask_command)

    calibrate = commands.add_parser(
        "calibrate", help="compute what HeadKV, DuoAttention, QFilter, KVzap, FastKVzip, LU-KV or ExpectedAttention(stats=) need, on your "
                          "model, offline",
        description="Compute a method's calibration on a model, offline, and save it: `headkv` (retrieval-reasoning "
                    "head importance, JSON, for HeadKV(head_scores=FILE)) and `duo_attention` (optimised "
                    "retrieval/streaming gates, JSON, for DuoAttention(head_patterns=FILE)) on locally generated "
                    "needle tasks; `qfilter` (Q-Filters, safetensors, for QFilter(filters=FILE)) and "
                    "`expected_attention` (query mean and covariance, safetensors, for ExpectedAttention(stats=FILE)) "
                    "on local text (the bundled essays, or --text-file); `kvzap` (a surrogate of KVzip+ scores trained on local "
                    "text, safetensors, for KVzap(surrogate=FILE)); `lukv` (per-head budget curves from answers on local "
                    "text, safetensors, for LUKV(curves=FILE)); `fastkvzip` (gates trained on KVzip's choices on local text, "
                    "safetensors, for FastKVzip(gates=FILE)).")
    calibrate.add_argument("kind", choices=list(CALIBRATIONS))
    calibrate.add_argument("-o", "--out", required=True, help="the file to write")
    calibrate.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    calibrate.add_argument("--samples", type=int, default=None,
                           help="needle samples (headkv) or text samples (default: 12; lukv 3, kvzap 16, restorekv 8)")
    calibrate.add_argument("--steps", type=int, default=None,
                           help="duo_attention, fastkvzip, restorekv: optimisation steps (default: 40; fastkvzip 5000, "
                                "restorekv 200)")
    calibrate.add_argument("--tokens", type=int, default=1500, help="length in tokens of each calibration sample")
    calibrate.add_argument("--text-file", help="every kind but headkv and duo_attention: a local text file to calibrate "
                                               "on (default: the bundled essays)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(handler=calibrate_command)

    evaluate = commands.add_parser(
        "eval", help="score methods on a benchmark: a resumable sweep, results as JSON lines, a table and plots",
        description="Run every method at every ratio (and quantizer) on a benchmark's samples; rows already in the "
                    "output file are skipped, so an interrupted sweep resumes. Query-agnostic by default: each "
                    "context is compressed once, then every question is asked.")
    evaluate.add_argument("-b", "--benchmark", help="benchmark name: " + "needle, ruler, passkey, longbench, ...")
    evaluate.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    evaluate.add_argument("-m", "--methods", default="full,streaming_llm,snapkv,knorm",
                          help="comma-separated method specs; 'full' is the uncompressed cache")
    evaluate.add_argument("-r", "--ratios", default="0.25,0.5,0.75")
    evaluate.add_argument("--quant", default="none", help="comma-separated quantizers, 'none' for no quantization")
    evaluate.add_argument("-n", "--samples", type=int, default=10, help="samples per task")
    evaluate.add_argument("--length", help="context length in tokens (synthetic benchmarks; needle: a list)")
    evaluate.add_argument("--tasks", help="comma-separated subset of the benchmark's tasks")
    evaluate.add_argument("--data-files", help="a local file in the dataset's schema instead of the hub")
    evaluate.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="a benchmark setting")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th sample from the I-th")
    evaluate.add_argument("--query-aware", action="store_true", help="compress with the question visible")
    evaluate.add_argument("--separate-prefills", action="store_true",
                          help="prefill each sample once per configuration instead of once for all (less memory)")
    evaluate.add_argument("--keep-going", action="store_true",
                          help="a configuration that raises is recorded (OUT.errors.jsonl) and the others go on; the "
                               "command then exits 1")
    evaluate.add_argument("--attn", default="sdpa")
    evaluate.add_argument("-o", "--out", help="JSON lines file (default results/eval/BENCHMARK.jsonl)")
    evaluate.add_argument("--config", help="a YAML file with any of these settings (the command line wins)")
    evaluate.set_defaults(handler=eval_command)

    benching = commands.add_parser("bench", add_help=False, help="peak memory, prefill time, decoding speed and "
                                   "cache bytes against context length, with plots (kvsqueeze bench --help)")
    benching.set_defaults(handler=None)

    lm_eval = commands.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line with the "
                                  "\"kvsqueeze\" model registered (kvsqueeze lm-eval run --model kvsqueeze "
                                  "--model_args method=snapkv,ratio=0.5 --tasks ...; needs kvsqueeze[lm-eval])")
    lm_eval.set_defaults(handler=None)
    serving = commands.add_parser("serve", add_help=False, help="compressed contexts behind an OpenAI-compatible "
                                  "HTTP API (kvsqueeze serve --help)")
    serving.set_defaults(handler=None)

    reporting = commands.add_parser("report", help="merge result files (shards) into one table and plots",
                                    description="Read eval result files, merge them (each row once), print the "
                                                "table and write the plots.")
    reporting.add_argument("files", nargs="+")
    reporting.add_argument("--plot", help="PNG path (default: next to the first file)")
    reporting.set_defaults(handler=report_command)

    ranking = commands.add_parser(
        "leaderboard", help="every method over RULER and the needle grid at several ratios, ranked, as a page",
        description="Run every method (at every ratio; methods with a budget at their defaults), every quantizer "
                    "alone and on a few eviction methods, over RULER and the needle grid; write a ranked page and two "
                    "figures (score against ratio, score against bytes held). Resumable: rerun to finish; shardable.")
    ranking.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    ranking.add_argument("-m", "--methods", help="comma-separated subset (default: every method)")
    ranking.add_argument("-r", "--ratios", default="0.25,0.5,0.75")
    ranking.add_argument("--quant", default="kivi-4,kivi-2", help="quantizers, alone and with --combined")
    ranking.add_argument("--combined", default="knorm,snapkv,streaming_llm",
                         help="eviction methods also run with each quantizer")
    ranking.add_argument("--ruler-length", type=int, default=4096)
    ranking.add_argument("--ruler-samples", type=int, default=1, help="RULER samples per task")
    ranking.add_argument("--ruler-tasks", help="comma-separated RULER tasks (default: all eleven)")
    ranking.add_argument("--needle-lengths", default="2048,4096")
    ranking.add_argument("--needle-depths", type=int, default=4)
    ranking.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th sample from the I-th")
    ranking.add_argument("-o", "--out", default="results/leaderboard", help="the folder of results")
    ranking.add_argument("--page", default="docs/leaderboard.md")
    ranking.add_argument("--readme", default=None, help="also write the top 15 into this README's leaderboard section")
    ranking.add_argument("--page-only", action="store_true", help="write the page from the results already there")
    ranking.set_defaults(handler=leaderboard_command)

    listing = commands.add_parser("methods", help="list every method and what it keeps",
                                  description="List every method: registry name, class, what it keeps.")
    listing.set_defaults(handler=methods_command)

    page = commands.add_parser("ui", help="a page that shows what a method kept, and the answers full vs compressed",
                               description="Serve a page (needs kvsqueeze[ui]): paste or upload a document, choose a "
                                           "method, ratio and quantizer, see the bytes held against the full cache, "
                                           "a heatmap of the tokens each layer and head kept, and the answers to a "
                                           "question with the full and the compressed cache, streamed side by side.")
    page.add_argument("--host", default="127.0.0.1")
    page.add_argument("--port", type=int, default=8000)
    page.add_argument("--model", default=None, help="hub id or local folder (default: the bundled SmolLM2)")
    page.set_defaults(handler=ui_command)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: it re-runs itself in a fresh process per measurement
        from . import bench

        return bench.main(argv[1:])
    if argv[:1] == ["lm-eval"]:  # lm-eval's own parser takes every argument after it
        try:
            from .integrations.lm_eval import command_line
        except ModuleNotFoundError as missing:
            print(f"kvsqueeze lm-eval: {missing.name} is not installed: pip install 'kvsqueeze[lm-eval]'",
                  file=sys.stderr)
            return 2
        return command_line(argv[1:])
    if argv[:1] == ["serve"]:  # its own parser too
        from .serve.cli import main as serve

        return serve(argv[1:])
    args = parser().parse_args(argv)
    handler = getattr(args, "handler", demo_command)
    try:
        return handler(args)
    except (ValueError, KeyError, OSError) as error:
        print(f"kvsqueeze: error: {error}", file=sys.stderr)
        return 2


def console() -> None:
    """The `kvsqueeze` command."""
    sys.exit(main())


if __name__ == "__main__":
    console()
