"""Quantized caches: packed bytes really held, attention over what they decode to, composition with any method."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvsqueeze
from kvsqueeze.ragged import decoded_attention
from kvsqueeze.quantizers import GEAR, KIVI, KVQuant, quantizer
from kvsqueeze.quantizers.base import largest_magnitudes, masked_range, pack_bits, unpack_bits
from kvsqueeze.quantizers.kvquant import nonuniform_codes
from kvsqueeze.ragged import RaggedLayer
from conftest import cached, output_cache, random_ids, tiny_model
from test_ragged import masked_attention

QUANTIZERS = ["kivi-2", "kivi-4", "kvquant-4", "gear-4"]


def small(spec: str):
    """A quantizer with groups and a residual window that fit the tiny models' short contexts."""
    q = quantizer(spec)
    q.group, q.residual = 8, 4
    if isinstance(q, KIVI):
        q.channel_group = 8
    return q


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 40), seed=st.integers(0, 999))
def test_bit_packing_round_trips_in_the_promised_bytes(bits, n, seed):
    codes = torch.randint(0, 2 ** bits, (3, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


@given(m=st.sampled_from([16, 40, 64, 4096]), count=st.integers(1, 100), levels=st.sampled_from([3, 50, 10**6]),
       seed=st.integers(0, 999))
def test_the_largest_magnitudes_found_in_the_largest_blocks_are_the_largest_of_the_row(m, count, levels, seed):
    """Whatever the row length, count and number of distinct values (few: many ties; of both signs), the entries
    found are distinct positions holding the same magnitudes as a top-k over the whole row's."""
    count = min(count, m)
    x = torch.randint(-levels, levels, (3, m), generator=torch.Generator().manual_seed(seed)).float()
    found = largest_magnitudes(x, count)
    assert found.shape == (3, count) and all(len(set(row.tolist())) == count for row in found)
    assert torch.equal(x.abs().gather(1, found).sort(-1).values, x.abs().topk(count, dim=-1).values.sort(-1).values)


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from([0, 1, -1]), fill=st.integers(0, 6), outliers=st.integers(0, 12), seed=st.integers(0, 999))
def test_masked_range_leaves_out_the_empty_slots_and_the_outliers(dim, fill, outliers, seed):
    """The range of each group over the entries that are held and not set apart, (0, 0) where none is left."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 4, generator=g) * 10
    valid = (torch.arange(6)[None, :] < torch.tensor([6, fill, 0])[:, None])[..., None]
    positions = torch.rand(3, 24, generator=g).argsort(-1)[:, :outliers] if outliers else None
    lo, hi = masked_range(x, valid, dim, positions)
    kept = valid.expand_as(x).clone()
    if positions is not None:
        kept.view(3, -1).scatter_(1, positions, False)
    expected_lo = x.masked_fill(~kept, float("inf")).amin(dim, keepdim=True)
    expected_hi = x.masked_fill(~kept, float("-inf")).amax(dim, keepdim=True)
    none_left = ~kept.any(dim, keepdim=True)
    assert torch.equal(lo, expected_lo.masked_fill(none_left, 0))
    assert torch.equal(hi, expected_hi.masked_fill(none_left, 0))


def decoded_in_place(pages, width: int, tail: int = 3) -> torch.Tensor:
    """`pages` decoded with `decode_into` into a strided view of a larger buffer, as attention does: pages as
    [rows, width] of one [rows, width * page + tail, dim] buffer."""
    n, page, dim = pages.shape
    buffer = torch.full((n // width, width * page + tail, dim), float("nan"))
    rows = buffer[:, :width * page].unflatten(1, (width, page))
    pages.decode_into(rows)
    assert buffer[:, width * page:].isnan().all()  # nothing written past the pages
    return rows.reshape(n, page, dim)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), dim=st.sampled_from([16, 24, 48, 64]), channel_group=st.sampled_from([8, 16, 32]),
       fill=st.integers(0, 8), width=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_kivi_decodes_in_place_into_a_view_of_a_larger_buffer(bits, dim, channel_group, fill, width, seed):
    """Codes written straight into their positions, then scaled and shifted there, give the decoded pages,
    whatever the bits, channel groups (dividing the dimension or not), fill and layout of the buffer."""
    generator = torch.Generator().manual_seed(seed)
    kivi = KIVI(bits=bits, group=8, channel_group=channel_group)
    pages = torch.randn(4, 8, dim, generator=generator) * torch.rand(1, 1, dim, generator=generator) * 4
    page_fill = torch.tensor([8, 8, 8, fill])
    for role in ("keys", "values"):
        encoded = kivi.encode(pages, page_fill, role)
        expected = encoded.dequantize()
        assert torch.equal(decoded_in_place(encoded, width), expected)
        error = (expected - pages).abs()[:3]  # the full pages: within a quantization step of what was stored
        assert float(error.max()) <= float(pages.abs().max()) * 2 / (2 ** bits - 1) + 1e-2


@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(["gear-2", "gear-4", "kvquant-2", "kvquant-4"]), dim=st.sampled_from([16, 64]),
       fill=st.integers(0, 8), width=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_other_quantizers_decode_into_a_view_of_a_larger_buffer(spec, dim, fill, width, seed):
    generator = torch.Generator().manual_seed(seed)
    q = quantizer(spec)
    pages = torch.randn(4, 8, dim, generator=generator) * torch.rand(1, 1, dim, generator=generator) * 4
    page_fill = torch.tensor([8, 8, 8, fill])
    for role in ("keys", "values"):
        encoded = q.encode(pages, page_fill, role)
        assert torch.equal(decoded_in_place(encoded, width), encoded.dequantize())


@pytest.mark.parametrize("role", ["keys", "values"])
def test_kivi_rounds_each_entry_to_its_groups_nearest_level(role):
    x = torch.randn(6, 32, 64, generator=torch.Generator().manual_seed(0))
    x[..., 5] *= 30  # an outlier channel
    fill = torch.tensor([32, 32, 32, 7, 1, 0])
    pages = KIVI(bits=4).encode(x, fill, role)
    valid = (torch.arange(32)[None, :] < fill[:, None])[..., None]
    error = (pages.dequantize() - x).abs()
    grouped = x.masked_fill(~valid, float("nan"))
    if role == "keys":  # one range per (page, channel)
        span = grouped.nan_to_num(-1e9).amax(1, keepdim=True) - grouped.nan_to_num(1e9).amin(1, keepdim=True)
    else:  # one range per (token, 32 channels)
        g = grouped.view(6, 32, 2, 32)
        span = (g.nan_to_num(-1e9).amax(-1, keepdim=True) - g.nan_to_num(1e9).amin(-1, keepdim=True)).expand(-1, -1, -1, 32)
        span = span.reshape(6, 32, 64)
    bound = span / 15 / 2 * 1.01 + 1e-2  # half a step, with float16 scales
    assert bool((error <= bound)[valid.expand_as(error)].all())


@pytest.mark.parametrize("spec", ["kvquant-4", "gear-4"])
def test_outliers_are_kept_exactly_and_lower_the_error(spec):
    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3, 7], x[2, 30, 60] = 80.0, -95.0
    fill = torch.full((4,), 32)
    q = quantizer(spec)
    with_outliers = q.encode(x, fill, "keys").dequantize()
    assert with_outliers[0, 3, 7].item() == pytest.approx(80.0, rel=1e-3)
    assert with_outliers[2, 30, 60].item() == pytest.approx(-95.0, rel=1e-3)
    q.outliers = 0.0
    without = q.encode(x, fill, "keys").dequantize()
    assert (with_outliers - x).norm() < (without - x).norm()


@pytest.mark.parametrize("spec", ["kvquant-4", "gear-4"])
def test_an_outliers_place_does_not_stretch_the_range_of_its_channel(spec):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 64, generator=g)
    x[:, :, 7] = 10 + 0.1 * torch.randn(2, 32, generator=g)  # a channel far from the page's other values
    x[0, 3, 7] = 80.0
    back = quantizer(spec).encode(x, torch.full((2,), 32), "keys").dequantize()
    assert back[0, 3, 7].item() == pytest.approx(80.0, rel=1e-3)
    assert (back[0, :, 7] - x[0, :, 7]).abs().max() < 0.05  # a 0.4-wide channel on 16 levels, not 10 wide


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), size=st.integers(1, 300), levels=st.sampled_from([2, 4, 16]), seed=st.integers(0, 999))
def test_kvquant_codes_each_value_to_its_nearest_level_within_a_grid_step(n, size, levels, seed):
    g = torch.Generator().manual_seed(seed)
    unit = torch.rand(n, size, generator=g) ** 3  # skewed, as real values are
    valid = torch.rand(n, size, generator=g) < 0.9
    fitted, codes = nonuniform_codes(unit, valid, levels, steps=1024)
    assert fitted.shape == (n, levels) and codes.shape == unit.shape and codes.dtype == torch.uint8
    assert bool((fitted.diff(dim=-1) >= 0).all()) and bool(((fitted >= 0) & (fitted <= 1)).all())
    distance = (unit[..., None] - fitted[:, None, :]).abs()  # [n, size, levels]
    chosen = distance.gather(-1, codes.long()[..., None])[..., 0]
    assert bool((chosen <= distance.amin(-1) + 1 / 1024 + 1e-6)[valid].all())


def test_kvquant_fits_a_page_whose_sums_pass_int32():
    """2**21 equal values near the top of the range: twice their sum in grid steps passes 2**31, and every level
    still sits on them (the sums are kept in int64; in int32 one level went to -0.0005)."""
    page = torch.full((1, 2 ** 21), 0.9995)
    levels, _ = nonuniform_codes(page, torch.ones_like(page, dtype=torch.bool), 16)
    torch.testing.assert_close(levels, torch.full((1, 16), 0.9995), atol=1 / 1024, rtol=0)


def test_gear_low_rank_correction_lowers_the_error():
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(2))
    x = x + torch.randn(4, 64, 1) @ torch.randn(4, 1, 64) * 3  # a strong low-rank component
    fill = torch.full((4,), 64)
    errors = [(GEAR(bits=2, rank=rank, outliers=0.0).encode(x, fill, "values").dequantize() - x).norm()
              for rank in (0, 2)]
    assert errors[1] < 0.9 * errors[0]


def test_kivi_2_holds_at_most_a_fifth_of_the_fp16_bytes_of_the_quantized_tokens():
    keys, values = torch.randn(2, 3, 2000, 64), torch.randn(2, 3, 2000, 64)
    keep = torch.rand(2, 3, 2000, generator=torch.Generator().manual_seed(0)) < 0.6
    layer = RaggedLayer.from_dense(keys, values, keep, seen=2000, quantizer=KIVI(bits=2))
    quantized = int(layer.lengths.sum())
    fp16_equivalent = quantized * 64 * 2 * 2
    pages = layer.pages_k.nbytes + layer.pages_v.nbytes + layer.page_segment.nbytes + layer.page_fill.nbytes
    assert pages <= 0.20 * fp16_equivalent
    assert layer.nbytes() == pages + layer.lengths.nbytes + layer.tail_k.nbytes + layer.tail_v.nbytes


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(QUANTIZERS), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 3]), n=st.integers(1, 60), q_len=st.integers(1, 4), decode_steps=st.integers(0, 20),
       kept=st.sampled_from(["per head", "same count", "all"]), pruned=st.booleans(), seed=st.integers(0, 9999))
@example(spec="kivi-4", batch=1, kv_heads=2, group=3, n=30, q_len=1, decode_steps=20, kept="same count", pruned=False,
         seed=0)  # a partly filled page mid-row once the tail is folded: empty slots among the tokens, masked
def test_attention_over_a_quantized_layer_equals_attention_over_what_it_decodes_to(spec, batch, kv_heads, group, n,
                                                                                   q_len, decode_steps, kept, pruned,
                                                                                   seed):
    """Whether each head keeps its own tokens, as many as the others (pages decoded in place, each row cut after
    its tokens) or all of them, with ThinK's pruned key channels or not, before and after decoded tokens are
    folded into pages."""
    g = torch.Generator().manual_seed(seed)
    dim = 16
    keys, values = torch.randn(batch, kv_heads, n, dim, generator=g), torch.randn(batch, kv_heads, n, dim, generator=g)
    if kept == "per head":
        keep = torch.rand(batch, kv_heads, n, generator=g) < 0.7
    elif kept == "same count":
        keep = torch.rand(batch, kv_heads, n, generator=g).argsort(-1).argsort(-1) < max(1, n * 2 // 3)
    else:
        keep = torch.ones(batch, kv_heads, n, dtype=torch.bool)
    channels = torch.rand(batch, kv_heads, dim, generator=g).argsort(-1)[..., :dim // 2] if pruned else None
    layer = RaggedLayer.from_dense(keys, values, keep, seen=n, key_channels=channels, quantizer=small(spec))
    for _ in range(decode_steps):  # single tokens; the tail is folded into quantized pages as it passes the window
        layer.update(torch.randn(batch, kv_heads, 1, dim, generator=g), torch.randn(batch, kv_heads, 1, dim, generator=g))
        assert layer.tail_k.shape[-2] <= layer.quantizer.residual + layer.page_size
    new_k, new_v = torch.randn(batch, kv_heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, q_len, dim, generator=g)
    layer.update(new_k, new_v)
    stored_k, stored_v, real = layer.dense_view()  # dequantized; the new tokens last, exact
    assert torch.equal(stored_k[:, :, -q_len:], new_k)
    query = torch.randn(batch, kv_heads * group, q_len, dim, generator=g)
    got = decoded_attention(layer, query, scaling=dim ** -0.5)
    expected = masked_attention(stored_k, stored_v, real[..., :-q_len], query, dim ** -0.5)
    assert torch.allclose(got, expected, atol=1e-4)
    assert layer.kept_per_head().tolist() == (keep.sum(-1) + decode_steps + q_len).tolist()


def test_folded_tokens_come_back_in_order():
    codec = KIVI(bits=8, group=4, residual=3, channel_group=8)
    keys = torch.randn(1, 2, 10, 8)
    keep = torch.ones(1, 2, 10, dtype=torch.bool)
    keep[0, 1, :5] = False
    layer = RaggedLayer.from_dense(keys, keys, keep, seen=10, quantizer=codec)
    new = [torch.randn(1, 2, 1, 8) for _ in range(12)]
    for token in new:
        layer.update(token, token)
    dense, _, real = layer.dense_view()
    for h, first in ((0, 0), (1, 5)):
        expected = torch.cat([keys[0, h, first:]] + [t[0, h] for t in new])
        assert torch.allclose(dense[0, h][real[0, h]], expected, atol=0.05)
    assert layer.tail_k.shape[-2] <= codec.residual + codec.group


@pytest.mark.parametrize("spec", QUANTIZERS)
@pytest.mark.parametrize("method", ["snapkv", "adakv", None])
def test_every_quantizer_runs_with_a_dense_and_a_head_wise_method(family, spec, method):
    model = tiny_model(family)
    context, question = random_ids(90), random_ids(6, seed=1)
    plain = kvsqueeze.compress(model, None, context, method and kvsqueeze.method(method, ratio=0.5))
    quantized = kvsqueeze.compress(model, None, context, method and kvsqueeze.method(method, ratio=0.5),
                                   quantizer=small(spec))
    assert quantized.stats.kept_per_layer_head == plain.stats.kept_per_layer_head
    assert quantized.nbytes() < 0.75 * plain.nbytes()
    assert quantized.stats.quantizer["name"] == spec.split("-")[0]
    tokens = quantized.generate(question, max_new_tokens=12)
    assert tokens.shape[-1] == 12
    compressible = [layer for layer in quantized.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert all(isinstance(layer, RaggedLayer) and layer.quantizer is not None for layer in compressible)


def test_quantized_chunked_prefill_stays_bounded_and_quantized():
    model = tiny_model("llama")
    method = kvsqueeze.KNorm(ratio=0.75)
    ctx = kvsqueeze.compress(model, None, random_ids(200), method, chunk_size=40, quantizer=small("kivi-2"))
    plain = kvsqueeze.compress(model, None, random_ids(200), method, chunk_size=40)
    assert ctx.stats.kept_per_layer_head == plain.stats.kept_per_layer_head
    assert ctx.cache.peak_bytes() <= plain.cache.peak_bytes()
    assert ctx.nbytes() < 0.5 * plain.nbytes()


def test_a_quantized_context_saves_and_loads_exactly(tmp_path):
    model = tiny_model("qwen3")
    question = random_ids(5, seed=3)
    for spec in ("kivi-2", "kvquant-4", "gear-4"):
        ctx = kvsqueeze.compress(model, None, random_ids(70), kvsqueeze.AdaKV(ratio=0.5), quantizer=small(spec))
        ctx.save(tmp_path / "ctx.safetensors")
        loaded = kvsqueeze.CompressedContext.load(tmp_path / "ctx.safetensors", model)
        assert loaded.nbytes() == ctx.nbytes()
        assert torch.equal(loaded.generate(question, max_new_tokens=8), ctx.generate(question, max_new_tokens=8))


def test_bad_quantizers_get_clear_errors():
    with pytest.raises(ValueError, match="unknown quantizer"):
        quantizer("int3")
    with pytest.raises(ValueError, match="bits"):
        quantizer("kivi-3")
    with pytest.raises(ValueError, match="number"):
        quantizer("kivi-two")
    with pytest.raises(ValueError, match="unknown quantizer"):
        kvsqueeze.compress(tiny_model("llama"), None, random_ids(10), quantizer="fp4")


def test_quantization_composes_with_a_batch_of_contexts():
    model = tiny_model("llama")
    rows = [random_ids(n, seed=n)[0] for n in (40, 70)]
    method = kvsqueeze.SnapKV(ratio=0.5, window_size=4)
    ctx = kvsqueeze.compress(model, None, rows, method, quantizer=small("kivi-4"))
    plain = kvsqueeze.compress(model, None, rows, method)
    assert ctx.stats.kept_per_layer_head == plain.stats.kept_per_layer_head
    assert ctx.nbytes() < 0.5 * plain.nbytes()
    assert ctx.generate([random_ids(3)[0], random_ids(5)[0]], max_new_tokens=4).shape == (2, 4)


def test_kivi_4_alone_finds_the_needle_on_the_bundled_model(bundled):
    from kvsqueeze.evaluation.needle import needle_sample

    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 1500, 0.5, seed=3)
    full = kvsqueeze.compress(model, tokenizer, sample.context)
    assert sample.correct(full.ask(sample.question, max_new_tokens=24))
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, quantizer="kivi-4")
    assert sample.correct(ctx.ask(sample.question, max_new_tokens=24))
    layers = ctx.cache.layers
    quantized_tokens = sum(int(layer.lengths.sum()) for layer in layers)
    fp16_equivalent = quantized_tokens * 64 * 2 * 2
    page_bytes = sum(layer.pages_k.nbytes + layer.pages_v.nbytes for layer in layers)
    assert page_bytes <= 0.36 * fp16_equivalent  # 4 bits = 25%, plus float16 scales and minima
    assert ctx.nbytes() < 0.25 * full.nbytes()  # against the float32 full cache


def test_a_transformers_quantized_cache_is_compressed_by_methods():
    from transformers import QuantizedCache

    model = tiny_model("llama")
    ids = random_ids(80)
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=4, q_group_size=16, residual_length=16)
    with torch.no_grad():
        model(ids, **cached(cache))
    reference = torch.cat(cache.layers[0]._dequantize(cache.layers[0]._quantized_keys).unbind(0))
    compressed = kvsqueeze.l2_compress(cache, keep_ratio=0.5, prune_after=0, model=model)
    layer = compressed.layers[0]
    assert isinstance(layer, RaggedLayer) and layer.quantizer.bits == 4 and layer.quantizer.residual == 16
    assert layer.kept_per_head().tolist() == [[40, 40]]
    kept, _, _ = layer.dense_view()
    assert all(torch.cdist(kept[0, h], reference[h]).amin(-1).max() < 0.1 for h in range(2))  # the backend's tokens
    assert compressed.nbytes() < 0.25 * 80 * 2 * 16 * 4 * 2 * 4  # 40 tokens x 2 heads, 4 bits, 4 layers
    with torch.no_grad(), kvsqueeze.attached(model):
        assert torch.isfinite(model(random_ids(3, seed=2), **cached(compressed)).logits).all()


def test_generate_with_a_transformers_quantized_cache_under_a_method():
    from transformers import QuantizedCache

    model = tiny_model("qwen2")
    ids = random_ids(60)
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=16, residual_length=8)
    with kvsqueeze.StreamingLLM(ratio=0.5).apply(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cached(cache), max_new_tokens=5,
                             do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    final = output_cache(out)
    assert isinstance(final, kvsqueeze.SqueezeCache)
    assert all(isinstance(layer, RaggedLayer) and layer.quantizer.bits == 2 for layer in final.layers)
    assert final.layers[0].kept_per_head().tolist() == [[30 + 4, 30 + 4]]  # half the context, then 4 generated
