"""Per-head scores computed offline (HeadKV's head importance, DuoAttention's gates), saved as JSON."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import torch

FORMAT = "kvsqueeze-head-scores/1"


def save_head_scores(path: str | Path, scores: torch.Tensor, model, kind: str, settings: dict | None = None) -> None:
    """Write a [layers, kv_heads] score table for `model`."""
    config = model.config.get_text_config()
    Path(path).write_text(json.dumps({
        "format": FORMAT, "kind": kind, "model": getattr(model.config, "_name_or_path", ""),
        "num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
        "settings": settings or {}, "scores": scores.tolist()}, indent=1))


def load_head_scores(source, model, kind: str) -> torch.Tensor:
    """A [layers, kv_heads] float tensor from a file written by `save_head_scores`, a DuoAttention
    `full_attention_heads.tsv` (one row of gates per layer), a tensor / nested list, or "smollm2" for
    the scores shipped for the bundled model (made with `kvsqueeze calibrate`)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        bundled = files("kvsqueeze").joinpath(f"data/{source}_{kind}.json")
        if not path.exists() and bundled.is_file():  # e.g. "smollm2": the scores shipped for the bundled model
            path = Path(str(bundled))
        if not path.exists():
            raise FileNotFoundError(f"no head scores at {path}; compute them with `kvsqueeze calibrate {kind}`")
        text = path.read_text()
        if path.suffix == ".tsv":
            table = [[float(x) for x in line.split()] for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"{path} is not a kvsqueeze head-score file")
            if data.get("kind") != kind:
                raise ValueError(f"{path} holds {data.get('kind')} scores, not {kind} scores")
            table = data["scores"]
    else:
        table = source
    scores = torch.as_tensor(table, dtype=torch.float32)
    config = model.config.get_text_config()
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    if tuple(scores.shape) != expected:
        raise ValueError(f"head scores of shape {tuple(scores.shape)} do not fit this model "
                         f"({expected[0]} layers x {expected[1]} KV heads)")
    return scores
