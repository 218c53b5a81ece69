"""LongBench: 21 bilingual long-context tasks (Bai et al., arXiv:2308.14508), from "THUDM/LongBench".

Prompts, generation lengths and metrics are those of the official `config/dataset2prompt.json`,
`config/dataset2maxlen.json` and `eval.py`. The context is the prompt up to and with the document; the
question is the rest of the prompt. With a tokenizer and `max_length` (the official `model2maxlen`, e.g.
31500 for a 32k model), the document loses its middle until the prompt fits, as `pred.py` truncates.
"""

from __future__ import annotations

import difflib
import re
from functools import partial

from ..base import Question
from . import hub
from .metrics import best, qa_f1, qa_f1_zh, rouge_l, rouge_l_zh

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question as concisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
              "a single phrase or sentence if possible. If the question cannot be answered based on the information "
              "in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
              "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question "
              "based on the above article as concisely as you can, using a single phrase or sentence if possible. If "
              "the question cannot be answered based on the information in the article, write \"unanswerable\". If "
              "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
                       "\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other "
                "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
                "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
                            "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
         "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
         "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p")

FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")  # eval.py keeps the first line of these answers
BARE_PROMPT = FIRST_LINE_ONLY + ("lcc", "repobench-p")  # pred.py gives these few-shot and code tasks no chat template


def classification_score(prediction: str, reference: str, all_classes: list[str]) -> float:
    """1 / (number of classes named) when the reference is among them; a class inside the reference (and not
    it) does not count."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def retrieval_score(prediction: str, reference: str, pattern: str = r"Paragraph (\d+)") -> float:
    """The share of the numbers in the prediction that are the paragraph's number."""
    target = re.findall(pattern, reference)[0]
    numbers = re.findall(r"\d+", prediction)
    return numbers.count(target) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """The share of the numbers in the prediction that are the count."""
    numbers = re.findall(r"\d+", prediction)
    return numbers.count(str(reference)) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, reference: str) -> float:
    """Edit similarity of the first predicted line that is code (no ```, # or //) with the reference line."""
    line = next((line for line in prediction.lstrip("\n").split("\n")
                 if "`" not in line and "#" not in line and "//" not in line), "")
    if not line or not reference:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, line, reference).ratio()) / 100


METRICS = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh, "hotpotqa": qa_f1,
    "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh, "gov_report": rouge_l, "qmsum": rouge_l,
    "multi_news": rouge_l, "vcsum": rouge_l_zh, "trec": classification_score, "triviaqa": qa_f1, "samsum": rouge_l,
    "lsht": classification_score, "passage_count": count_score, "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": partial(retrieval_score, pattern=r"段落(\d+)"), "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}


class LongBench(hub.HubBenchmark):
    """LongBench (arXiv:2308.14508), one task per hub config, split "test"; or local files in its schema
    (`input`, `context`, `answers`, `length`, `dataset`, `language`, `all_classes`, `_id`): `data_files` is a
    path for one task or {task: path}."""

    name = "longbench"
    tasks = TASKS
    hub_id = "THUDM/LongBench"
    config_suffix = ""

    def metadata(self, row: dict) -> dict:
        return {"length": row.get("length"), "language": row.get("language")}

    def samples(self, tokenizer, n=None, seed=0):
        out = []
        for task, path in self.files.items():
            prefix, rest = PROMPTS[task].split("{context}")
            parts = []
            for row in hub.load_rows(self.hub_id, task + self.config_suffix, "test", path):
                question = Question(rest.replace("{input}", row["input"]), list(row["answers"]),
                                    max_new_tokens=MAX_NEW_TOKENS[task],
                                    metadata={"all_classes": row["all_classes"]} if row.get("all_classes") else {})
                parts.append(hub.Part(row["_id"], prefix, row["context"], "", [question], self.metadata(row)))
            for sample in hub.samples(task, parts, n, seed, tokenizer, self.max_length):
                sample.chat_template = task not in BARE_PROMPT
                out.append(sample)
        return out

    def score(self, prediction, question, task):
        hub.check_task(task, type(self).tasks, self.name)
        if task in FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        metric = METRICS[task]
        if metric is classification_score:
            metric = partial(classification_score, all_classes=question.metadata.get("all_classes") or [])
        return best(metric, prediction, question.answers)

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": {t: p for t, p in self.files.items() if p},
                "max_length": self.max_length}
