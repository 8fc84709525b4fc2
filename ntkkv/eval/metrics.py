"""LongBench's metrics, as LongBench's own metrics.py and eval.py define them.

Each metric scores one prediction against one reference answer in [0, 1]; a sample's
score is the best over its reference answers, a dataset's score the mean ×100 rounded
to two decimals.  Scores must stay comparable with published tables, so the quirks
of the reference implementation are kept (noted where they matter).
"""
import difflib
import logging
import re
import string
from collections import Counter

import numpy as np
from rapidfuzz import fuzz
from rouge import Rouge

logger = logging.getLogger(__name__)

CHINESE_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
    "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
ENGLISH_PUNCTUATION_SET = frozenset(string.punctuation)
ALL_PUNCTUATION_SET = frozenset(string.punctuation + CHINESE_PUNCTUATION)

# LongBench keeps only the first line of the answer for these few-shot tasks
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")

# LongBench-E's length buckets: (name, exclusive upper bound of `length`)
LENGTH_BUCKETS = (("0-4k", 4000), ("4-8k", 8000), ("8k+", float("inf")))


def normalize_english(text):
    """Lower-case; drop punctuation, the articles a/an/the and repeated whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in ENGLISH_PUNCTUATION_SET)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_chinese(text):
    """Lower-case; drop English and Chinese punctuation and all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in ALL_PUNCTUATION_SET)
    return "".join(text.split())


def token_f1(predicted_tokens, reference_tokens):
    """F1 of the multiset overlap of two token lists."""
    overlap = sum((Counter(predicted_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction, reference, **_):
    return token_f1(normalize_english(prediction).split(), normalize_english(reference).split())


def jieba_words(text):
    import jieba  # on first use: only the Chinese datasets need it, and its dictionary takes a while to load

    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading to stderr at INFO; library code stays quiet
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction, reference, **_):
    def normalized_words(text):
        words = (normalize_chinese(word) for word in jieba_words(text))
        return [word for word in words if word]

    return token_f1(normalized_words(prediction), normalized_words(reference))


def rouge_score(prediction, reference, **_):
    """ROUGE-L F of the `rouge` package (summary level, sentences split on '.').

    Any failure scores 0, as in LongBench: empty hypotheses, and sentences so long that
    the package's recursive LCS exceeds Python's recursion limit.
    """
    try:
        scores = Rouge().get_scores([prediction], [reference], avg=True)
    except (ValueError, RecursionError) as error:
        logger.debug("rouge failed (%s); scoring 0", error)
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction, reference, **_):
    return rouge_score(" ".join(jieba_words(prediction)), " ".join(jieba_words(reference)))


def count_of_matching_numbers(prediction, target):
    """Share of the numbers in `prediction` that equal `target` (0 when there are none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == str(target) for number in numbers) / len(numbers)


def count_score(prediction, reference, **_):
    return count_of_matching_numbers(prediction, reference)


def retrieval_score(prediction, reference, **_):
    return _retrieval(prediction, reference, r"Paragraph (\d+)")


def retrieval_zh_score(prediction, reference, **_):
    return _retrieval(prediction, reference, r"段落(\d+)")


def _retrieval(prediction, reference, paragraph_pattern):
    paragraph_ids = re.findall(paragraph_pattern, reference)
    if not paragraph_ids:
        return 0.0
    return count_of_matching_numbers(prediction, paragraph_ids[0])


def fuzzy_ratio(first, second, matcher="levenshtein"):
    """fuzzywuzzy's `fuzz.ratio`: an integer 0-100.

    "levenshtein" is fuzzywuzzy with python-Levenshtein installed (as PyramidKV and most
    KV-cache papers run it); "difflib" is fuzzywuzzy without it (LongBench's own
    requirements), which scores many code lines lower.
    """
    if first == second:
        return 100
    if not first or not second:
        return 0
    if matcher == "levenshtein":
        similarity = fuzz.ratio(first, second)
    elif matcher == "difflib":
        similarity = 100 * difflib.SequenceMatcher(None, first, second).ratio()
    else:
        raise ValueError(f"unknown fuzzy matcher {matcher!r}; choose one of: difflib, levenshtein")
    return int(round(similarity))


def first_code_line(text):
    """The first line that holds no markdown fence or comment marker ('`', '#', '//')."""
    for line in text.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction, reference, matcher="levenshtein", **_):
    return fuzzy_ratio(first_code_line(prediction), reference, matcher) / 100


def classification_score(prediction, reference, all_classes=(), **_):
    """1/k when the reference is among the k class names found in the prediction, else 0.

    Class names contained in the reference (but not equal to it) are dropped, with
    LongBench's quirk kept: it removes them while iterating over the same list, so the
    name right after each removed one is never examined.
    """
    matched = [name for name in all_classes if name in prediction]
    position = 0
    while position < len(matched):
        name = matched[position]
        if name in reference and name != reference:
            matched.remove(name)
        position += 1
    # LongBench's difflib fallback for "no match" sits behind a condition that is always true
    if reference in matched:
        return 1.0 / len(matched)
    return 0.0


DATASET_METRIC = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}


def sample_score(dataset, prediction, answers, all_classes=None, matcher="levenshtein"):
    """Best score of one prediction over its reference answers, in [0, 1]."""
    try:
        metric = DATASET_METRIC[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASET_METRIC))}"
        ) from None
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes or (), matcher=matcher))
    return best


def dataset_score(dataset, records, matcher="levenshtein"):
    """LongBench's score of a dataset: mean best score ×100, two decimals.

    `records` are prediction lines (dicts with pred, answers, all_classes).
    """
    if not records:
        return None
    total = 0.0
    for record in records:
        total += sample_score(dataset, record["pred"], record["answers"], record.get("all_classes"), matcher)
    return round(100 * total / len(records), 2)


def bucket_scores(dataset, records, matcher="levenshtein"):
    """LongBench-E's scores by the sample's `length`: {"0-4k": .., "4-8k": .., "8k+": ..}.

    An empty bucket scores None (LongBench writes NaN, which is not valid JSON).
    """
    by_bucket = {name: [] for name, _ in LENGTH_BUCKETS}
    for record in records:
        score = sample_score(dataset, record["pred"], record["answers"], record.get("all_classes"), matcher)
        bucket = next(name for name, upper in LENGTH_BUCKETS if record["length"] < upper)
        by_bucket[bucket].append(score)
    return {
        name: float(round(100 * np.mean(scores), 2)) if scores else None
        for name, scores in by_bucket.items()
    }
