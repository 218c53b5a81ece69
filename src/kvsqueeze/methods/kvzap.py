from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..context import LayerContext
from ..hooks import observing
from .base import ScorerMethod
from .dms import DMS
from .kvzip import KVzip

FORMAT = "kvsqueeze-kvzap/1"


def save_module(module: nn.Module, path: str | Path, format: str, model=None, metadata: dict | None = None) -> None:
    """A module trained offline on `model`, as safetensors (float32) with its `format` and `metadata` in the header."""
    header = {"format": format, "model": "" if model is None else str(getattr(model.config, "_name_or_path", ""))}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, str(path),
              metadata=header | (metadata or {}))


def read_module(path: str | Path, format: str, what: str, routine: str) -> tuple[dict, dict]:
    """(tensors, header) of a file `save_module` wrote in `format`; a missing file says which `routine` makes one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}; train one on your model with "
                                f"{routine}(model, tokenizer, out={str(path)!r})")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != format:
            raise ValueError(f"{path} is not a {what} file (format {metadata.get('format')!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, metadata


class Surrogate(nn.Module):
    """KVzap's surrogate: per layer, a linear map or a one-hidden-layer MLP (GELU) from a token's hidden state
    (the attention's input) to the log KVzip+ score of its KV pair in each KV head."""

    def __init__(self, n_layers: int, hidden_size: int, kv_heads: int, kind: str = "mlp", hidden_dim: int = 512):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"a KVzap surrogate is 'linear' or 'mlp'; got {kind!r}")
        self.kind, self.hidden_dim = kind, hidden_dim
        self.shape = (n_layers, hidden_size, kv_heads)
        self.layers = nn.ModuleList(
            nn.Linear(hidden_size, kv_heads) if kind == "linear" else
            nn.Sequential(nn.Linear(hidden_size, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, kv_heads))
            for _ in range(n_layers))

    @classmethod
    def for_model(cls, model, kind: str = "mlp", hidden_dim: int = 512, seed: int = 0) -> "Surrogate":
        """An untrained surrogate shaped for `model` (random weights)."""
        config = model.config.get_text_config()
        torch.manual_seed(seed)
        return cls(config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, kind, hidden_dim)

    def forward(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Predicted log scores [batch, kv_heads, tokens] of hidden states [batch, tokens, hidden]."""
        module = self.layers[layer]
        weight = next(module.parameters())
        return module(hidden_states.to(weight.device, weight.dtype)).transpose(1, 2)

    def save(self, path: str | Path, model=None) -> None:
        save_module(self, path, FORMAT, model, {"kind": self.kind, "hidden_dim": str(self.hidden_dim),
                                                "shape": ",".join(map(str, self.shape))})

    @classmethod
    def load(cls, path: str | Path) -> "Surrogate":
        tensors, metadata = read_module(path, FORMAT, "KVzap surrogate", "kvsqueeze.methods.kvzap.train_surrogate")
        n_layers, hidden_size, kv_heads = map(int, metadata["shape"].split(","))
        surrogate = cls(n_layers, hidden_size, kv_heads, metadata["kind"], int(metadata["hidden_dim"]))
        surrogate.load_state_dict(tensors)
        return surrogate.eval()


class KVzap(ScorerMethod):
    """Keeps the tokens a small surrogate, reading their hidden states, predicts KVzip+ would keep.

    Jeblick and Jegou, "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning", arXiv:2601.07891. A
    per-layer linear map or MLP (hidden 512, GELU), trained offline on the same model by
    `train_surrogate` to predict log KVzip+ scores (attention in the reconstruction of the context,
    divided by the query's hidden-state norm, times ||W_o v||) from the attention's input, scores every
    token in one pass, without extra forwards. With `threshold` (the paper's use, as kvpress's
    DMSPress: the leaderboard runs thresholds -3 to -6 with a 128-token window, prefill only) a head
    keeps the tokens scoring at least the threshold plus the last `window_size` tokens, so the budget
    adapts to the input (heads ragged); otherwise `ratio` / `budget` keep each head's top scores.
    `surrogate` is the file `train_surrogate` saved (or a `Surrogate`). Inherent cost: the surrogate itself, over
    every layer's hidden states; the MLP's two products are 8% of a layer's weights on the bundled model (0.3 s of
    a 2,048-token prefill's 5 s on 1 thread), about 1% on an 8B model.
    """

    name = "kvzap"
    calibration = "kvzap"
    declares = frozenset({"whole_context"})  # the scores of earlier chunks' tokens are not kept
    extra_work = ("surrogate",)

    surrogate: "str | Path | Surrogate | None" = None
    threshold: float | None = None
    window_size: int = 128

    def __post_init__(self):
        if self.surrogate is None:
            raise ValueError("KVzap needs a surrogate trained on your model: surrogate=FILE from "
                             "kvsqueeze.methods.kvzap.train_surrogate(model, tokenizer, out=FILE)")
        if self.threshold is not None and (self.ratio is not None or self.budget is not None):
            raise ValueError("give KVzap a threshold or a ratio / budget, not both")
        super().__post_init__()
        if self.threshold is not None:
            self.ratio = None  # the threshold decides, not a ratio
        self.trained = self.surrogate if isinstance(self.surrogate, Surrogate) else None  # a file: loaded by setup
        self.dms = None if self.threshold is None else DMS(self.threshold, scorer=self, window_size=self.window_size)

    def setup(self, model):
        if self.trained is None:
            self.trained = Surrogate.load(self.surrogate)
        config = model.config.get_text_config()
        expected = (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads)
        if self.trained.shape != expected:
            raise ValueError(f"this KVzap surrogate was made for {self.trained.shape} (layers, hidden size, KV heads), "
                             f"not this model's {expected}: train one with train_surrogate")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.n_stored != ctx.n_new:
            raise ValueError("KVzap scores the tokens of the forward that adds them: compress the whole context at once")
        return self.trained(ctx.layer_idx, ctx.hidden_states).float()

    def compress(self, ctx: LayerContext) -> None:
        if self.dms is None:
            super().compress(ctx)
        else:
            self.dms.compress(ctx)


def kvzip_targets(model, tokenizer, texts: list[str], plus: bool = True, progress: bool = True
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (hidden states [n, hidden], KVzip(+) scores [n, kv_heads])} over the tokens of `texts` (sinks and the
    chat template's header left out), from KVzip's reconstruction on the full cache."""
    from ..pipeline import compress

    scorer = KVzip(plus=plus)
    pairs: dict[int, list] = {}
    for text in tqdm(texts, desc="KVzip scores", disable=not progress):
        hidden: dict[int, torch.Tensor] = {}
        with observing(model, lambda ctx: hidden.__setitem__(ctx.layer_idx, ctx.hidden_states[0].float().cpu())):
            ctx = compress(model, tokenizer, text)
        with torch.no_grad():
            importance = scorer.importance(model, ctx.cache, ctx.context_ids, ctx.context_mask, ctx.prompt)
        for layer, scores in importance.items():
            scores = scores[0].float().cpu()
            scored = torch.isfinite(scores[0])
            pairs.setdefault(layer, []).append((hidden[layer][scored], scores[:, scored].T))
    return {layer: (torch.cat([h for h, _ in p]), torch.cat([s for _, s in p])) for layer, p in pairs.items()}


def default_texts(tokenizer, samples: int, tokens: int) -> list[str]:
    """`samples` pieces of about `tokens` tokens of the bundled essays."""
    from ..evaluation.needle import haystack

    return ["\n\n".join(haystack(tokenizer, tokens, seed=seed)) for seed in range(samples)]


def fit_linear(x: torch.Tensor, y: torch.Tensor, module: nn.Linear, alpha: float = 1.0) -> None:
    """Ridge regression (with intercept, penalty `alpha`, as scikit-learn's Ridge) into `module`."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    weight = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(x.shape[1]), xc.T @ yc)  # [hidden, kv]
    module.weight.data.copy_(weight.T)
    module.bias.data.copy_(mean_y - mean_x @ weight)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, module: nn.Module, epochs: int, lr: float, batch_size: int,
            seed: int) -> None:
    """MSE with AdamW, a cosine learning-rate schedule and gradient clipping at 1 (kvpress's training)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = nn.functional.mse_loss(module(x[batch]), y[batch])
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimiser.step()
                schedule.step()


def train_surrogate(model, tokenizer, texts: list[str] | None = None, out: str | Path | None = None,
                    kind: str = "mlp", hidden_dim: int = 512, samples: int = 16, tokens: int = 1000,
                    epochs: int = 15, lr: float = 5e-3, batch_size: int = 512, seed: int = 0,
                    progress: bool = True) -> Surrogate:
    """Train KVzap's surrogate on `model`, offline; save it to `out` (safetensors) when given.

    Targets are log KVzip+ scores of the tokens of `texts` (default: `samples` pieces of `tokens` tokens
    of the bundled essays; kvpress trains on ~1000-token texts of a multi-domain corpus), computed by
    KVzip's reconstruction on the full cache. "linear" is a ridge regression per layer; "mlp" (the
    paper's better variant) is trained with AdamW (lr 5e-3, 15 epochs, batches of 512, as kvpress).
    """
    if texts is None:
        texts = default_texts(tokenizer, samples, tokens)
    data = kvzip_targets(model, tokenizer, texts, plus=True, progress=progress)
    surrogate = Surrogate.for_model(model, kind, hidden_dim, seed)
    for layer, (x, scores) in tqdm(data.items(), desc="KVzap surrogate", disable=not progress):
        y = scores.clamp(min=1e-12).log()
        if kind == "linear":
            fit_linear(x, y, surrogate.layers[layer])
        else:
            fit_mlp(x, y, surrogate.layers[layer], epochs, lr, batch_size, seed)
    surrogate.eval()
    if out is not None:
        surrogate.save(out, model)
    return surrogate
