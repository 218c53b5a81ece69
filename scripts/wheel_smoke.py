"""The smoke test of an installed kvsqueeze wheel, run by scripts/wheel.sh from a folder outside the source tree.

It checks that kvsqueeze is imported from the installed package (not a source checkout), that its version
is the one the wheel's metadata gives, that the package data is there, that the `kvsqueeze` command runs
(`--help`, `methods`, and a clear message for an extra that is not installed), and compresses a context and
asks it a question on a tiny Llama built from a config, with a small tokenizer made here: nothing is downloaded.
"""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import kvsqueeze

PACKAGE_DATA = ["data/document.txt", "data/essays.txt", "data/smollm2_headkv.json", "data/smollm2_duo_attention.json",
                "ui/static/index.html", "ui/static/app.js"]
TEXT = ("the keeper of the red lighthouse cooks a stew with seven bay leaves and the boats come back at noon "
        "while the gulls wait on the old pier and the town sleeps ") * 6


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke: FAILED: {what}")
    print(f"wheel smoke: ok: {what}")


def command(*args: str) -> subprocess.CompletedProcess:
    kvsqueeze_command = Path(sys.executable).with_name("kvsqueeze")
    return subprocess.run([str(kvsqueeze_command), *args], capture_output=True, text=True, timeout=300)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(TEXT.split()) | {"how", "many", "leaves", "?"})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def main() -> None:
    source = Path(os.environ.get("KVSQUEEZE_SOURCE", "/nonexistent")).resolve()
    installed = Path(kvsqueeze.__file__).resolve()
    check(Path(sysconfig.get_paths()["purelib"]).resolve() in installed.parents,
          f"kvsqueeze is imported from the environment's site-packages ({installed.parent})")
    check(source / "src" not in installed.parents, "and not from the source tree")
    check(importlib.metadata.version("kvsqueeze") == kvsqueeze.__version__, f"version {kvsqueeze.__version__}")
    for name in PACKAGE_DATA:
        check(files("kvsqueeze").joinpath(name).is_file(), f"package data {name}")

    helped = command("--help")
    check(helped.returncode == 0 and "methods" in helped.stdout and "lm-eval" in helped.stdout, "kvsqueeze --help")
    listed = command("methods")
    check(listed.returncode == 0 and "snapkv" in listed.stdout and "kivi" in listed.stdout, "kvsqueeze methods")
    for extra, args in (("lm-eval", ["lm-eval", "--help"]), ("ui", ["ui"])):
        missing = command(*args)
        try:
            importlib.metadata.distribution({"lm-eval": "lm_eval", "ui": "starlette"}[extra])
            continue  # the extra is installed here: nothing to check
        except importlib.metadata.PackageNotFoundError:
            check(missing.returncode == 2 and f"kvsqueeze[{extra}]" in missing.stderr,
                  f"kvsqueeze {args[0]} without its extra says to install kvsqueeze[{extra}]")

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ctx = kvsqueeze.compress(model, tokenizer, TEXT, kvsqueeze.SnapKV(ratio=0.5, window_size=8))
    answer = ctx.ask("how many leaves ?", max_new_tokens=6)
    check(isinstance(answer, str), f"compress and ask on a tiny Llama: {answer!r}")
    share = ctx.stats.bytes_held / ctx.stats.bytes_uncompressed
    check(abs(share - 0.5) < 0.05, f"the compressed cache holds {share:.0%} of the bytes")
    print("wheel smoke: passed")


if __name__ == "__main__":
    main()
