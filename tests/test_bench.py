"""`kvsqueeze bench`: every configuration measured in its own process, rows and a plot written."""

import json

import pytest

from kvsqueeze import cli

pytestmark = pytest.mark.bundled


def test_bench_measures_each_configuration_and_plots(tmp_path):
    out = tmp_path / "bench.jsonl"
    assert cli.main(["bench", "--lengths", "128,256", "--configs", "full,after_prefill,chunked", "--methods", "knorm",
                     "--ratio", "0.5", "--chunk", "64", "--decode-tokens", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["length"], r["config"]) for r in rows] == [(n, c) for n in (128, 256)
                                                          for c in ("full", "after_prefill", "chunked")]
    for n in (128, 256):
        full, after, chunked = (r for r in rows if r["length"] == n)
        assert after["cache_mib"] == pytest.approx(full["cache_mib"] / 2, rel=0.05)
        assert chunked["cache_mib"] == pytest.approx(after["cache_mib"], rel=0.05)
        assert all(r["peak_mib"] > 0 and r["decode_tok_s"] > 0 and r["prefill_s"] > 0 for r in (full, after, chunked))
    assert out.with_suffix(".png").exists()
