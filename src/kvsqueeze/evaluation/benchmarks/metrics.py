"""The metrics the hub benchmarks share, re-implemented from their official scripts without their dependencies.

Each function scores one prediction against one reference in [0, 1] (benchmarks take the best over the
references and scale to [0, 100]). Differences from the scripts, all small: ROUGE is computed here without
stemming (the scripts use the `rouge` / `rouge_score` packages), Chinese text is compared character by
character (LongBench splits it into jieba words), and the edit similarity is difflib's ratio (fuzzywuzzy's
own pure-Python fallback).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

PUNCTUATION = frozenset(string.punctuation)
ZH_PUNCTUATION = frozenset("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛"
                           "〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


# ---------------------------------------------------------------- answers as words: F1 and exact match (SQuAD style)

def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: SQuAD's normalisation, used by
    LongBench, InfiniteBench and Zero-SCROLLS."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh(text: str) -> str:
    """Lower case, without Chinese or English punctuation nor any whitespace."""
    return "".join(ch for ch in text.lower() if ch not in PUNCTUATION and ch not in ZH_PUNCTUATION
                   and not ch.isspace())


def f1(prediction: list, reference: list) -> float:
    """F1 of the tokens two lists share (counted with multiplicity)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised answers (LongBench's qa_f1_score)."""
    return f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """Character F1 of the normalised answers (InfiniteBench's Chinese F1; LongBench's counts jieba words)."""
    return f1(list(normalize_zh(prediction)), list(normalize_zh(reference)))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ---------------------------------------------------------------- ROUGE

def lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f(hits: int, n_prediction: int, n_reference: int) -> float:
    if hits == 0:
        return 0.0
    precision, recall = hits / n_prediction, hits / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str | list, reference: str | list) -> float:
    """ROUGE-L F1: longest common subsequence of the whitespace tokens (or of two token lists)."""
    p = prediction.split() if isinstance(prediction, str) else prediction
    r = reference.split() if isinstance(reference, str) else reference
    return _f(lcs(p, r), len(p), len(r))


def rouge_l_zh(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over characters (whitespace left out)."""
    return rouge_l([c for c in prediction if not c.isspace()], [c for c in reference if not c.isspace()])


def rouge_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric words, as `rouge_score` splits text (without its optional stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_n(prediction: list, reference: list, n: int) -> float:
    """ROUGE-N F1 of two token lists."""
    grams_p = Counter(tuple(prediction[i:i + n]) for i in range(len(prediction) - n + 1))
    grams_r = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
    return _f(sum((grams_p & grams_r).values()), sum(grams_p.values()), sum(grams_r.values()))


def rouge_mean(prediction: str, reference: str) -> float:
    """Geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (Zero-SCROLLS' summarisation score)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    return (rouge_n(p, r, 1) * rouge_n(p, r, 2) * rouge_l(p, r)) ** (1 / 3)


# ---------------------------------------------------------------- extracting an answer

def choice_letter(response: str) -> str | None:
    """The letter of "The correct answer is (X)" (or "... is X"), as LongBench v2's script reads it."""
    response = response.replace("*", "")
    match = (re.search(r"The correct answer is \(([A-D])\)", response)
             or re.search(r"The correct answer is ([A-D])", response))
    return match.group(1) if match else None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}, or "\\boxed X"), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    opening = rest.find("{")
    if opening < 0:
        return None
    depth = 0
    for i in range(opening, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[opening + 1:i]
    return None


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """A solution's final answer: its last \\boxed{} content, else its last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def normalize_math(answer: str) -> str:
    """A LaTeX answer in a canonical form, after the MATH benchmark's `strip_string` (arXiv:2103.03874):
    no spaces, units, dollars, percents, degrees or \\left/\\right; \\dfrac -> \\frac; "\\frac12" ->
    "\\frac{1}{2}"; "a/b" -> "\\frac{a}{b}"; "0.5" -> "\\frac{1}{2}"; "x = 3" -> "3"."""
    s = str(answer).strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]  # units
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = s.rstrip(".")
    if s == "0.5":
        s = "\\frac{1}{2}"
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if match:
        s = f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}"
    return s


def math_equal(prediction: str | None, reference: str) -> bool:
    """Equal after `normalize_math`, or as numbers."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    if a == b:
        return True
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


# ---------------------------------------------------------------- misc

def ascii_fold(text: str) -> str:
    """Accents removed (what `unidecode` does to Latin text)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def best(metric, prediction: str, references: list[str], **kwargs) -> float:
    """The best score over the references, scaled to [0, 100] (0 without references)."""
    return 100.0 * max((metric(prediction, r, **kwargs) for r in references), default=0.0)
