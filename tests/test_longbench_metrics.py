"""LongBench metrics on hand-computed cases, and eval.py end to end on prediction files made here."""
import csv
import importlib.util
import json
import random
from pathlib import Path

import pytest

from ntkkv.eval import metrics
from ntkkv.eval.scoring import paired_difference, table_rows

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"ntkkv_script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- English QA F1 -----------------------------------------------------------------------------

def test_english_normalisation_drops_case_punctuation_articles_and_spaces():
    assert metrics.normalize_english("The  Cat's hat, an   apple.") == "cats hat apple"


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The Eiffel Tower!", "eiffel tower", 1.0),
    ("Paris, France", "Paris", 2 / 3),          # P = 1/2, R = 1
    ("cat cat dog", "cat dog dog", 2 / 3),      # multiset overlap {cat, dog} = 2 of 3 each side
    ("London", "Paris", 0.0),
    ("the", "a", 0.0),                          # both empty after dropping articles
])
def test_qa_f1(prediction, reference, expected):
    assert metrics.qa_f1_score(prediction, reference) == pytest.approx(expected)


# --- Chinese (jieba) -----------------------------------------------------------------------------

def test_qa_f1_zh_uses_jieba_words_and_drops_punctuation():
    # jieba: 我们 / 在 / 北京大学 / 学习 against 北京大学 -> P = 1/4, R = 1
    assert metrics.qa_f1_zh_score("我们在北京大学学习", "北京大学") == pytest.approx(0.4)
    # the full stop is a word of its own for jieba and normalises away
    assert metrics.qa_f1_zh_score("北京大学。", "北京大学") == pytest.approx(1.0)
    assert metrics.qa_f1_zh_score("上海", "北京大学") == 0.0


def test_chinese_normalisation():
    assert metrics.normalize_chinese("Ａ，北京 大学！") == "ａ北京大学"


def test_rouge_zh_scores_jieba_words():
    # 会议/讨论/了/预算/问题/和/人员/安排 (8 words) against 会议/讨论/了/预算/问题 (5): LCS 5
    recall, precision = 5 / 5, 5 / 8
    expected = 2 * precision * recall / (precision + recall)
    score = metrics.rouge_zh_score("会议讨论了预算问题和人员安排", "会议讨论了预算问题")
    assert score == pytest.approx(expected, abs=1e-6)


# --- ROUGE-L of the `rouge` package --------------------------------------------------------------

def test_rouge_l_counts_distinct_words_like_the_rouge_package():
    # LCS "the cat sat" = 3; the reference has 5 *distinct* words (the rouge package's
    # exclusive n-grams), so R = 3/5, P = 1 and F = 0.75 (rouge-score would give 2/3)
    assert metrics.rouge_score("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)


def test_rouge_l_unions_lcs_over_hypothesis_sentences():
    # hypothesis sentences "x y" and "z w" each match part of the one reference sentence
    assert metrics.rouge_score("x y. z w", "x y z w") == pytest.approx(1.0, abs=1e-6)
    assert metrics.rouge_score("x y", "x y z w") == pytest.approx(2 * 0.5 / 1.5, abs=1e-6)


def test_rouge_failures_score_zero():
    assert metrics.rouge_score("", "a reference") == 0.0
    assert metrics.rouge_score("...", "a reference") == 0.0


# --- classification, retrieval, count -----------------------------------------------------------

def test_classification_score():
    classes = ["Music", "Entertainment", "Sports"]
    assert metrics.classification_score("Entertainment", "Entertainment", all_classes=classes) == 1.0
    assert metrics.classification_score("Music or Entertainment", "Entertainment", all_classes=classes) == 0.5
    assert metrics.classification_score("Sports", "Entertainment", all_classes=classes) == 0.0
    assert metrics.classification_score("no idea", "Entertainment", all_classes=classes) == 0.0


def test_classification_keeps_longbench_removal_quirk():
    # "ab" is inside the reference "abc" and is removed; LongBench's loop then skips "a"
    # (removing while iterating), so two names survive and the score is 1/2, not 1
    assert metrics.classification_score("abc", "abc", all_classes=["ab", "a", "abc"]) == 0.5


@pytest.mark.parametrize("prediction, expected", [
    ("Paragraph 3", 1.0),
    ("Paragraph 3 or Paragraph 5", 0.5),
    ("Paragraph 13", 0.0),
    ("I do not know", 0.0),
])
def test_retrieval_score(prediction, expected):
    assert metrics.retrieval_score(prediction, "Paragraph 3") == expected


def test_retrieval_zh_score():
    assert metrics.retrieval_zh_score("答案是：段落2", "段落2") == 1.0
    assert metrics.retrieval_zh_score("段落2或段落7", "段落2") == 0.5
    assert metrics.retrieval_zh_score("段落12", "段落2") == 0.0


def test_count_score():
    assert metrics.count_score("4", "4") == 1.0
    assert metrics.count_score("There are 4 unique paragraphs out of 10", "4") == 0.5
    assert metrics.count_score("four", 4) == 0.0


# --- code similarity ------------------------------------------------------------------------------

def test_code_sim_takes_first_line_without_fence_or_comment():
    prediction = "\n```python\n# next line\n// also a comment\nx = foo(1)\ny = 2\n"
    assert metrics.first_code_line(prediction) == "x = foo(1)"
    # one character replaced in 10: indel distance 2 over 20 characters -> ratio 90
    assert metrics.code_sim_score(prediction, "x = foo(2)") == 0.9
    assert metrics.code_sim_score("# only comments", "x = 1") == 0.0


def test_fuzzy_ratio_rounds_to_integers_like_fuzzywuzzy():
    assert metrics.fuzzy_ratio("abc", "abd") == 67      # 4/6
    assert metrics.fuzzy_ratio("", "") == 100
    assert metrics.fuzzy_ratio("abc", "") == 0


def test_fuzzy_ratio_levenshtein_and_difflib_differ_as_fuzzywuzzy_does():
    # longest common subsequence "bc": 2·2/8 = 50; difflib first matches the "a"s: 2·1/8 = 25
    assert metrics.fuzzy_ratio("abxcd", "bca", "levenshtein") == 50
    assert metrics.fuzzy_ratio("abxcd", "bca", "difflib") == 25
    with pytest.raises(ValueError, match="unknown fuzzy matcher"):
        metrics.fuzzy_ratio("a", "b", "jaro")


def longest_common_subsequence(first, second):
    lengths = [[0] * (len(second) + 1) for _ in range(len(first) + 1)]
    for i, a in enumerate(first):
        for j, b in enumerate(second):
            lengths[i + 1][j + 1] = lengths[i][j] + 1 if a == b else max(lengths[i][j + 1], lengths[i + 1][j])
    return lengths[-1][-1]


def test_levenshtein_ratio_is_twice_lcs_over_total_length():
    generator = random.Random(0)
    for _ in range(300):
        first = "".join(generator.choices("ab c(", k=generator.randint(1, 12)))
        second = "".join(generator.choices("ab c(", k=generator.randint(1, 12)))
        if first == second:
            continue
        expected = int(round(200 * longest_common_subsequence(first, second) / (len(first) + len(second))))
        assert metrics.fuzzy_ratio(first, second) == expected, (first, second)


# --- per-sample and per-dataset scoring -------------------------------------------------------------

def test_few_shot_tasks_score_only_the_first_line():
    prediction = "\nParis\nLondon"
    assert metrics.sample_score("triviaqa", prediction, ["London"]) == 0.0
    # hotpotqa keeps every line: "paris london" against "london" -> 2/3
    assert metrics.sample_score("hotpotqa", prediction, ["London"]) == pytest.approx(2 / 3)


def test_sample_score_is_best_over_answers():
    assert metrics.sample_score("hotpotqa", "Paris", ["Paris France", "Paris"]) == 1.0
    assert metrics.sample_score("hotpotqa", "Paris", ["Paris France"]) == pytest.approx(2 / 3)


def test_dataset_score_is_mean_times_100_with_two_decimals():
    records = [
        {"pred": "Paris", "answers": ["Paris"]},
        {"pred": "Rome", "answers": ["Paris"]},
        {"pred": "Paris", "answers": ["Paris France"]},
    ]
    assert metrics.dataset_score("hotpotqa", records) == 55.56
    assert metrics.dataset_score("hotpotqa", []) is None


def test_bucket_scores_split_at_4000_and_8000():
    records = [
        {"pred": "x b", "answers": ["x b"], "length": 3999},
        {"pred": "y", "answers": ["x b"], "length": 4000},
        {"pred": "x b", "answers": ["x b"], "length": 7999},
        {"pred": "b", "answers": ["x b"], "length": 8000},
    ]
    assert metrics.bucket_scores("qasper", records) == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 66.67}
    assert metrics.bucket_scores("qasper", records[:1]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'squad'"):
        metrics.sample_score("squad", "a", ["a"])


# --- eval.py end to end ------------------------------------------------------------------------------

def write_predictions(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records) + tail,
                    encoding="utf-8")


def record(sample_id, pred, answers, length=1000, all_classes=None):
    return {"pred": pred, "answers": answers, "all_classes": all_classes, "length": length, "_id": sample_id}


@pytest.fixture
def results_dir(tmp_path):
    """Two methods on hotpotqa and multifieldqa_zh; SnapKV's hotpotqa half in a rank's part file."""
    group = tmp_path / "tiny-llama_128"
    write_predictions(group / "hotpotqa" / "FullKV.json",
                      [record("h1", "Paris", ["Paris"]), record("h2", "Rome", ["Rome"])])
    write_predictions(group / "hotpotqa" / "SnapKV.json", [record("h1", "Paris France", ["Paris"])],
                      tail='{"pred": "unfinished')   # what a kill mid-write leaves
    write_predictions(group / "hotpotqa" / "SnapKV.part1.jsonl",
                      [record("h2", "Milan", ["Rome"]), record("h1", "duplicate ignored", ["Paris"])])
    write_predictions(group / "multifieldqa_zh" / "FullKV.json", [record("z1", "北京大学。", ["北京大学"])])
    write_predictions(group / "multifieldqa_zh" / "SnapKV.json", [record("z1", "我们在北京大学学习", ["北京大学"])])
    return tmp_path


def test_eval_writes_metrics_json_and_results_csv(results_dir, capsys):
    load_script("eval").main(["--results_dir", str(results_dir)])
    group = results_dir / "tiny-llama_128"
    hotpot = json.loads((group / "hotpotqa" / "metrics.json").read_text())
    # SnapKV: h1 "Paris France" vs "Paris" = 2/3, h2 "Milan" = 0 -> 33.33 over 2 samples
    assert hotpot == {"FullKV": {"score": 100.0, "samples": 2}, "SnapKV": {"score": 33.33, "samples": 2}}
    chinese = json.loads((group / "multifieldqa_zh" / "metrics.json").read_text())
    assert chinese == {"FullKV": {"score": 100.0, "samples": 1}, "SnapKV": {"score": 40.0, "samples": 1}}
    with open(results_dir / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["method", "hotpotqa", "multifieldqa_zh", "average"],
        ["tiny-llama_128/FullKV", "100.0", "100.0", "100.0"],
        ["tiny-llama_128/SnapKV", "33.33", "40.0", "36.66"],   # (33.33 + 40) / 2 = 36.665 -> 36.66
    ]
    printed = capsys.readouterr().out
    assert "tiny-llama_128/SnapKV" in printed and "36.66" in printed


def test_eval_on_one_model_folder_names_rows_by_method(results_dir):
    group = results_dir / "tiny-llama_128"
    load_script("eval").main(["--results_dir", str(group)])
    with open(group / "results.csv", newline="") as handle:
        labels = [row[0] for row in csv.reader(handle)]
    assert labels == ["method", "FullKV", "SnapKV"]


def test_eval_longbench_e_buckets(tmp_path):
    folder = tmp_path / "m_64" / "qasper_e"
    write_predictions(folder / "H2O.json", [
        record("e1", "yes", ["yes"], length=1000),
        record("e2", "no", ["yes"], length=5000),
        record("e3", "yes", ["yes"], length=12000),
    ])
    write_predictions(tmp_path / "m_64" / "qasper" / "H2O.json", [record("p1", "no", ["yes"])])
    load_script("eval").main(["--results_dir", str(tmp_path), "--longbench_e"])
    assert json.loads((folder / "metrics.json").read_text()) == {
        "H2O": {"score": {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}, "samples": 3}
    }
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["method", "qasper 0-4k", "qasper 4-8k", "qasper 8k+", "average 0-4k", "average 4-8k",
                       "average 8k+"]
    assert rows[1] == ["m_64/H2O", "100.0", "0.0", "100.0", "100.0", "0.0", "100.0"]
    # the plain qasper folder is not a LongBench-E result and was left alone
    assert not (tmp_path / "m_64" / "qasper" / "metrics.json").exists()


def test_eval_reports_a_malformed_line_with_file_and_line(tmp_path):
    path = tmp_path / "m_1" / "trec" / "SnapKV.json"
    write_predictions(path, [record("t1", "Location", ["Location"], all_classes=["Location"])])
    with open(path, "a") as handle:
        handle.write("{not json}\n")
        handle.write(json.dumps(record("t2", "Human", ["Location"], all_classes=["Location", "Human"])) + "\n")
    eval_script = load_script("eval")
    with pytest.raises(SystemExit, match=r"SnapKV.json:2: malformed JSON"):
        eval_script.main(["--results_dir", str(tmp_path)])
    eval_script.main(["--results_dir", str(tmp_path), "--on_bad_line", "skip"])
    assert json.loads((path.parent / "metrics.json").read_text())["SnapKV"] == {"score": 50.0, "samples": 2}


def test_eval_without_predictions_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no prediction files"):
        load_script("eval").main(["--results_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        load_script("eval").main(["--results_dir", str(tmp_path / "missing")])


def test_table_marks_missing_datasets_and_averages_what_is_there():
    header, rows = table_rows({"A": {"trec": 10.0, "lcc": 20.0}, "B": {"trec": 30.0}})
    assert header == ["method", "trec", "lcc", "average"]
    assert rows == [["A", 10.0, 20.0, 15.0], ["B", 30.0, None, 30.0]]


# --- paired comparison against a baseline ---------------------------------------------------------

def count_record(sample_id, predicted, answer):
    """passage_count scores 1 when the predicted number is the answer, else 0."""
    return record(sample_id, str(predicted), [str(answer)])


def test_paired_difference_matches_samples_by_id_and_brackets_the_mean():
    base = [count_record(f"s{i}", i, i) for i in range(4)] + [count_record("s4", 0, 9)]  # 4 right, 1 wrong
    other = [count_record("s4", 9, 9), count_record("s3", 3, 3), count_record("s2", 0, 2),  # +1, 0, -1
             count_record("s1", 1, 1), count_record("s0", 0, 0), count_record("extra", 5, 5)]
    paired = paired_difference("passage_count", base, other)
    # differences over the 5 shared samples: +100, 0, -100, 0, 0 -> mean 0; "extra" has no pair
    assert paired["samples"] == 5 and paired["delta"] == 0.0
    assert -100 <= paired["low"] < 0 < paired["high"] <= 100
    better = paired_difference("passage_count", base, [count_record("s4", 9, 9)] * 1)
    assert better == {"samples": 1, "delta": 100.0, "low": 100.0, "high": 100.0}
    assert paired_difference("passage_count", base, [count_record("other", 1, 1)]) is None


def test_paired_interval_narrows_with_more_samples():
    def runs(n):
        base = [count_record(f"s{i}", 0, i % 2) for i in range(n)]  # right on the even samples
        other = [count_record(f"s{i}", 0 if i % 4 else 1, i % 2) for i in range(n)]  # wrong on every fourth
        return paired_difference("passage_count", base, other)

    small, large = runs(20), runs(400)
    assert small["delta"] == large["delta"] == -25.0  # one sample in four: 100 -> 0
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3


def test_eval_baseline_table_and_its_errors(results_dir, capsys):
    eval_script = load_script("eval")
    eval_script.main(["--results_dir", str(results_dir), "--baseline", "FullKV"])
    with open(results_dir / "paired_vs_FullKV.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    # hotpotqa: SnapKV h1 2/3 vs 1, h2 0 vs 1 -> mean of (-33.33, -100); multifieldqa_zh: 40 vs 100
    assert rows[0] == ["method", "dataset", "samples", "vs FullKV", "95% low", "95% high"]
    assert rows[1][:4] == ["tiny-llama_128/SnapKV", "hotpotqa", "2", "-66.67"]
    assert rows[2][:4] == ["tiny-llama_128/SnapKV", "multifieldqa_zh", "1", "-60.0"]
    assert "vs FullKV" in capsys.readouterr().out
    message = "baseline 'Full' has no prediction file; the methods found are: FullKV, SnapKV"
    with pytest.raises(SystemExit, match=message):
        eval_script.main(["--results_dir", str(results_dir), "--baseline", "Full"])
