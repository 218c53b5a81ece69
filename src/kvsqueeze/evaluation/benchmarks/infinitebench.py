"""InfiniteBench (∞Bench): 12 tasks past 100k tokens (Zhang et al., arXiv:2402.13718), from
"xinrongzhang2022/InfiniteBench" (one split per task, loaded with the features its card gives).

Prompts are the official ones for open models (`src/prompt.py`, `yarn_mistral_templates`), their closing
cue ("The pass key is", ...) given as the answer prefix; generation lengths are `eval_utils.py`'s and each
task is scored by its function in the official `src/compute_scores.py`. With a tokenizer and `max_length`
the document loses its middle, as the official scripts truncate (128k tokens there).
"""

from __future__ import annotations

import re

from ..base import Question
from . import hub
from .metrics import qa_f1, qa_f1_zh, rouge_l, rouge_tokens

DIALOGUE = ("Below is a dialogue script where one random occurrence of a character name is replaced with "
            "\"$$MASK$$\", and you should try to guess who that character is.\n\n")
HIDDEN = "There is an important info hidden inside a lot of irrelevant text. Find it"
OPTIONS = "\nA. {A}\nB. {B}\nC. {C}\nD. {D}"

# task -> (text before the document, question after it, answer prefix); {input} is the row's question
TEMPLATES = {
    "passkey": (f"{HIDDEN} and memorize them. I will quiz you about the important information there.\n\n",
                "\n\n{input}", "The pass key is"),
    "number_string": (f"{HIDDEN}. I will quiz you about the important information there.\n\n", "\n\n{input}",
                      "The sequence of digits is"),
    "kv_retrieval": ("Extract the value corresponding to the specified key in the JSON object below.\n\n",
                     "\n\n{input}", ""),
    "longbook_sum_eng": ("Summarize the book below.\n\n", "", "Summary:"),
    "longbook_choice_eng": ("Read the book and answer the question.\n\n", "\n\nQuestion: {input}" + OPTIONS,
                            "The letter of the correct answer is"),
    "longbook_qa_eng": ("Read the book and answer the question. Be very concise in your answer.\n\n",
                        "\n\nQuestion: {input}", "Answer:"),
    "longbook_qa_chn": ("阅读以下书籍然后回答问题。\n\n", "\n\n问题：{input}", "答案："),
    "longdialogue_qa_eng": (DIALOGUE, "", "The name that has been replaced with $$MASK$$ is likely"),
    "math_find": ("{prefix}\n\n", "\n\n{input}", ""),
    "math_calc": ("Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: "
                  "[1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: ", "", "Values:"),
    "code_run": ("There is a function called {func} in the following Python code.\n\n",
                 "\n\nPlease compute the exact value of {func_call}.", "The value of {func_call} is"),
    "code_debug": ("Following is a Python code where exactly one of the functions/methods has a deliberate error "
                   "that makes it crash.\n\n", "\n\nOptions:" + OPTIONS, "The correct option is:"),
}

MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200,
                  "longbook_choice_eng": 40, "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40,
                  "math_find": 3, "math_calc": 30000, "code_run": 5, "code_debug": 5}

TASKS = tuple(TEMPLATES)
CHOICE_TASKS = ("longbook_choice_eng", "code_debug")
NUMBER_TASKS = ("code_run", "math_find", "math_calc")


def features():
    """The columns as the dataset card says to load them (the files' types differ between tasks)."""
    from datasets import Features, Sequence, Value

    return Features({"id": Value("int64"), "context": Value("string"), "input": Value("string"),
                     "answer": Sequence(Value("string")), "options": Sequence(Value("string"))})


def number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def first_integer(prediction: str) -> str:
    return next((part for part in re.split("[^0-9]", prediction) if part), "")


def words(prediction: str, separators: str = "\n:\"'.,?!{}") -> list[str]:
    for c in separators:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def after_prefix(prediction: str, prefixes: tuple[str, ...], targets: list[str]) -> bool | None:
    """Whether the text after the first of `prefixes` found ("answer is:", ...) and one more character starts
    with a target; None when the prediction holds none of them."""
    prefix = next((p for p in prefixes if p in prediction), None)
    if prefix is None:
        return None
    rest = prediction[prediction.find(prefix) + len(prefix) + 1:]
    return any(rest.startswith(t) for t in targets)


def squeeze(prediction: str, removed: tuple[str, ...]) -> str:
    for c in removed:
        prediction = prediction.replace(c, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    return prediction


def choice_score(prediction: str, label: list[str]) -> bool:
    """En.MC: the first letter, the option itself, the letter after "answer is", or the first lone letter;
    `label` is [option text, letter]."""
    prediction = prediction.strip()
    if not prediction:
        return False
    if prediction[0] in "ABCD":
        return prediction[0] in label
    if prediction in label:
        return True
    prediction = squeeze(prediction, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"))
    right = after_prefix(prediction, ("answer is:", "answer:", "answer is", "option is"), label)
    if right is not None:
        return right
    return next((word in label for word in prediction.split() if word in "ABCD"), False)


def debug_score(prediction: str, label: list[str]) -> bool:
    """Code.Debug: "X." or "X:" first, or the letter / function name after "answer is:", "is:", ..."""
    prediction = prediction.strip()
    name, letter = label
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return True
    prediction = squeeze(prediction, ("\n", "`", "'", '"', "-", "*", "Option", "option"))
    return bool(after_prefix(prediction, ("answer is:", "is:", "answer:", "correct option is:"), [letter, name]))


def math_find_score(prediction: str, label: int | float) -> bool:
    found = re.search(r"\d+\.\d+|\d+", prediction)
    return found is not None and float(found.group(0)) == label


def math_calc_score(prediction: str, label: list[int]) -> float:
    """The share of the intermediate values right before the first wrong one."""
    predicted = [int(part) for part in re.split("[^0-9]", prediction) if part]
    right = 0
    for expected, got in zip(label, predicted):
        if expected != got:
            break
        right += 1
    return right / len(label)


def code_run_score(prediction: str, label: int) -> bool:
    found = words(prediction.strip(), "\n.`'\":")
    try:
        return bool(found) and int(found[-1]) == label
    except ValueError:
        return False


def dialogue_score(prediction: str, label: list[str]) -> bool:
    return label[0].upper() in [word.upper() for word in words(prediction.strip())]


class InfiniteBench(hub.HubBenchmark):
    """InfiniteBench (arXiv:2402.13718); `data_files`: a local JSON lines file in its schema (`id`, `context`,
    `input`, `answer`, `options`) for one task, or {task: path}."""

    name = "infinitebench"
    tasks = TASKS
    hub_id = "xinrongzhang2022/InfiniteBench"

    def samples(self, tokenizer, n=None, seed=0):
        out = []
        for task, path in self.files.items():
            rows = hub.load_rows(self.hub_id, None, task, path, features=features())
            parts = [self.part(task, row) for row in rows]
            out += hub.samples(task, parts, n, seed, tokenizer, self.max_length)
        return out

    def part(self, task: str, row: dict) -> hub.Part:
        before, after, answer_prefix = TEMPLATES[task]
        fields = {"input": row["input"]}
        if task == "code_run":
            call = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", row["input"])[0]
            fields |= {"func": call.split("(")[0], "func_call": call}
        elif task == "math_find":
            target = re.findall(r"The \w+ number", row["input"])[0].lower()
            fields["prefix"] = f"What is {target} in the following list?"
        options = dict(zip("ABCD", row.get("options") or []))
        answers = list(row["answer"])
        if task in CHOICE_TASKS and not (len(answers) == 2 and answers[1] in ("A", "B", "C", "D")):
            answers = [answers[0], "ABCD"[list(row["options"]).index(answers[0])]]  # the official [text, letter]
        question = Question(after.format(**fields, **options), answers, answer_prefix.format(**fields),
                            MAX_NEW_TOKENS[task], {"options": options} if options else {})
        return hub.Part(str(row["id"]), before.format(**fields), row["context"], "", [question])

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        answers = question.answers
        if task in NUMBER_TASKS:
            answers = [number(a) for a in answers]
        if task in ("passkey", "number_string"):
            right = first_integer(prediction) in answers
        elif task == "kv_retrieval":
            right = any(a in words(prediction) for a in answers)
        elif task == "longbook_choice_eng":
            right = choice_score(prediction, answers)
        elif task == "code_debug":  # the parser looks for "is:", which the answer prefix holds
            right = debug_score(question.answer_prefix + " " + prediction.strip(), answers)
        elif task == "longdialogue_qa_eng":
            right = dialogue_score(prediction, answers)
        elif task == "math_find":
            right = math_find_score(prediction, answers[0])
        elif task == "math_calc":
            right = math_calc_score(prediction, answers)
        elif task == "code_run":
            right = code_run_score(prediction, answers[0])
        elif task == "longbook_qa_eng":
            right = max(qa_f1(prediction, a) for a in answers)
        elif task == "longbook_qa_chn":
            right = max(qa_f1_zh(prediction, a) for a in answers)
        else:  # longbook_sum_eng: ROUGE-L on rouge_score's words (officially `evaluate`'s rougeLsum)
            right = max(rouge_l(rouge_tokens(prediction), rouge_tokens(a)) for a in answers)
        return 100.0 * float(right)

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": {t: p for t, p in self.files.items() if p},
                "max_length": self.max_length}
