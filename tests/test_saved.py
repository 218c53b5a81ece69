"""Saved contexts are verified, not trusted: every tensor present, of its dtype and shape, with its checksum; the
model's configuration and weights the ones the context was made with."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kvsqueeze
from kvsqueeze.saved import UNVERIFIED, UnverifiedContextWarning
from conftest import random_ids, tiny_model


def saved(tmp_path, model=None, method=None):
    model = model or tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(40), method or kvsqueeze.AdaKV(ratio=0.5))
    path = tmp_path / "ctx.safetensors"
    ctx.save(path)
    return model, ctx, path


def rewritten(path, out, change):
    """The file at `path` written again to `out` with `change(tensors, metadata)` applied."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_a_saved_context_comes_back_exactly(tmp_path):
    model, ctx, path = saved(tmp_path)
    loaded = kvsqueeze.CompressedContext.load(path, model)
    question = random_ids(4, seed=3)
    assert loaded.nbytes() == ctx.nbytes() and loaded.stats == ctx.stats
    assert torch.equal(loaded.generate(question, max_new_tokens=5), ctx.generate(question, max_new_tokens=5))
    with safe_open(str(path), "pt") as f:
        method = json.loads(f.metadata()["method"])
    assert method["name"] == "adakv" and method["settings"]["ratio"] == 0.5


def test_a_missing_tensor_is_named(tmp_path):
    model, _, path = saved(tmp_path)
    bad = rewritten(path, tmp_path / "bad.safetensors", lambda t, m: t.pop("layers.1.pages_k"))
    with pytest.raises(kvsqueeze.CorruptContextError, match=r"missing layers\.1\.pages_k"):
        kvsqueeze.CompressedContext.load(bad, model)


def test_altered_bytes_are_caught(tmp_path):
    model, _, path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a byte of tensor data, at the end of the file
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(kvsqueeze.CorruptContextError, match="altered"):
        kvsqueeze.CompressedContext.load(bad, model)


def test_cut_context_ids_are_caught(tmp_path):
    model, _, path = saved(tmp_path)

    def cut(tensors, metadata):
        tensors["context_ids"] = tensors["context_ids"][:, :30].contiguous()
    with pytest.raises(kvsqueeze.CorruptContextError, match="context_ids is torch.int64 \\[1, 30\\]"):
        kvsqueeze.CompressedContext.load(rewritten(path, tmp_path / "cut.safetensors", cut), model)

    def cut_consistently(tensors, metadata):  # even with the metadata rewritten to match
        cut(tensors, metadata)
        listing = json.loads(metadata["tensors"])
        listing["context_ids"] = {"dtype": "torch.int64", "shape": [1, 30],
                                  "sha256": kvsqueeze.saved.checksum(tensors["context_ids"])}
        metadata["tensors"] = json.dumps(listing)
    with pytest.raises(kvsqueeze.CorruptContextError, match="seen \\[40\\] tokens but holds 30"):
        kvsqueeze.CompressedContext.load(rewritten(path, tmp_path / "cut2.safetensors", cut_consistently), model)


def test_a_truncated_file_is_refused(tmp_path):
    model, _, path = saved(tmp_path)
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(kvsqueeze.CorruptContextError, match="cut or damaged"):
        kvsqueeze.CompressedContext.load(cut, model)


def test_other_weights_are_refused(tmp_path):
    model, _, path = saved(tmp_path)
    scaled = tiny_model()
    with torch.no_grad():
        scaled.model.layers[0].self_attn.k_proj.weight.mul_(3)
    with pytest.raises(kvsqueeze.ModelMismatchError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
        kvsqueeze.CompressedContext.load(path, scaled)
    other = tiny_model(seed=1)  # the same shape, other weights, the embedding copied
    with torch.no_grad():
        other.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
    with pytest.raises(kvsqueeze.ModelMismatchError, match="other weights"):
        kvsqueeze.CompressedContext.load(path, other)
    with pytest.raises(kvsqueeze.ModelMismatchError, match="num_hidden_layers"):
        kvsqueeze.CompressedContext.load(path, tiny_model(num_hidden_layers=2))
    with torch.no_grad():  # changed in place after a first load: the fingerprint follows
        kvsqueeze.CompressedContext.load(path, model)
        model.model.layers[3].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(kvsqueeze.ModelMismatchError, match=r"layers\.3\.mlp\.up_proj"):
        kvsqueeze.CompressedContext.load(path, model)


def test_files_saved_before_verification_load_with_a_warning(tmp_path):
    model, ctx, path = saved(tmp_path, method=kvsqueeze.KNorm(ratio=0.5))

    def unverified(tensors, metadata):
        metadata["format"] = UNVERIFIED
        del metadata["tensors"]
    old = rewritten(path, tmp_path / "old.safetensors", unverified)
    with pytest.warns(UnverifiedContextWarning, match="save it again"):
        loaded = kvsqueeze.CompressedContext.load(old, model)
    assert loaded.nbytes() == ctx.nbytes()
    loaded.save(tmp_path / "again.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvsqueeze.CompressedContext.load(tmp_path / "again.safetensors", model)
