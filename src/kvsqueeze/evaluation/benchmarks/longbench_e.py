"""LongBench-E: 13 LongBench tasks resampled for an even spread of lengths (arXiv:2308.14508), hub configs
"<task>_e" of "THUDM/LongBench". Same prompts and metrics as LongBench; each sample records its length
bucket (0-4k, 4-8k, 8k+ words or characters), over which the official `eval.py --e` averages."""

from __future__ import annotations

from .longbench import LongBench

TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
         "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


class LongBenchE(LongBench):
    """LongBench-E (arXiv:2308.14508): LongBench's tasks with an even length distribution."""

    name = "longbench_e"
    tasks = TASKS
    config_suffix = "_e"

    def metadata(self, row: dict) -> dict:
        return super().metadata(row) | {"length_bucket": length_bucket(row["length"])}
