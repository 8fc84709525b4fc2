"""RULER: the task generators against RULER's definitions, its metrics on hand-computed cases, the
KVCache-Factory file reader, run_ruler.py end to end on a tiny Llama, and eval.py --ruler."""
import collections
import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import ntkkv
from ntkkv.eval import longbench_run, ruler
from ntkkv.eval.jsonl import read_jsonl
from ntkkv.eval.longbench_run import GenerationSettings
from tiny import load_script, save_chat_llama

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LENGTH = 1500
VT_LENGTH = 1200  # vt's worked example alone takes about 500 tokens
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NUMBER = r"[1-9][0-9]{6}"
ENDINGS = (".", "?", "!", '."', ".)")


def essay_text(seed):
    """Made-up essay sentences ending in . ? ! and closing quotes or brackets, from the shipped word lists."""
    words = ruler.SINGLE_WORDS
    sentences = []
    for number in range(400):
        a, b, c = (words[(seed * 131 + number * step) % len(words)] for step in (7, 11, 13))
        sentences.append(f"The {a} {b} was about {c} and more{ENDINGS[number % len(ENDINGS)]}")
    return " ".join(sentences[:200]) + "\n\n" + "\n".join(sentences[200:])


def ruler_tokenizer():
    """A byte-level BPE tokenizer trained on RULER's wording and words, with a ChatML chat template."""
    corpus = [ruler.NOISE, ruler.VT_TEMPLATE, ruler.VT_PREFIX, ruler.CWE_TEMPLATE, ruler.CWE_PREFIX,
              ruler.FWE_TEMPLATE, ruler.FWE_PREFIX, ruler.QA_TEMPLATE, *ruler.niah_wording("numbers", True),
              " ".join(ruler.SINGLE_WORDS), essay_text(0), " ".join(f"{n}. {n * 7}" for n in range(1, 1000))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHATML
    return tokenizer


def count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tokenizer():
    return ruler_tokenizer()


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    (folder / "a.txt").write_text(essay_text(1))
    (folder / "b.txt").write_text(essay_text(2))
    return folder


SQUAD = {"data": [
    {"title": "Colours", "paragraphs": [
        {"context": "The grass in the valley is green all year.", "qas": [
            {"question": "What colour is the grass?", "answers": [{"text": "green"}, {"text": "green all year"}],
             "is_impossible": False},
            {"question": "What colour is the moon?", "answers": [], "is_impossible": True},
        ]},
        {"context": "The sky above the harbor is blue at noon.", "qas": [
            {"question": "When is the sky blue?", "answers": [{"text": "at noon"}], "is_impossible": False},
        ]},
    ]},
    *[{"title": f"Filler {number}", "paragraphs": [
        {"context": f"Filler paragraph {number} tells of the {word} and nothing else.",
         "qas": [{"question": f"What does filler {number} tell of?", "answers": [{"text": word}]}]},
    ]} for number, word in enumerate(ruler.NOUNS[:40])],
]}
HOTPOT = [
    {"question": f"Which {noun} came first?", "answer": noun,
     "context": [[f"Title {noun} {part}", [f"The {noun} part {part} begins. ", f"It ends with {part}."]]
                 for part in range(4)]}
    for noun in ruler.NOUNS[40:70]
]


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    (folder / "squad.json").write_text(json.dumps(SQUAD))
    (folder / "hotpotqa.json").write_text(json.dumps(HOTPOT))
    return folder


@pytest.fixture(scope="module")
def sources(essays, qa_dir):
    return ruler.Sources(essays, qa_dir)


# --- the task table against RULER's synthetic.yaml and constants --------------------------------------------

def test_tasks_are_rulers():
    niah = {  # synthetic.yaml: haystack, key type, value type, keys, values, queries
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
        "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
    }
    for task, (haystack, key_type, value_type, keys, values, queries) in niah.items():
        assert ruler.TASKS[task] == ruler.Niah(haystack, key_type, value_type, keys, values, queries), task
    assert ruler.TASKS["vt"] == ruler.VariableTracking(chains=1, hops=4)
    assert ruler.TASKS["cwe"] == ruler.CommonWords(common=10, common_repeats=30, uncommon_repeats=3)
    assert ruler.TASKS["fwe"] == ruler.FrequentWords(alpha=2.0, word_length=6)
    assert (ruler.TASKS["qa_1"].dataset, ruler.TASKS["qa_2"].dataset) == ("squad", "hotpotqa")
    answer_room = {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32, **{task: 128 for task in niah}}
    assert {task: spec.max_new_tokens for task, spec in ruler.TASKS.items()} == answer_room
    assert {task for task, spec in ruler.TASKS.items() if spec.metric == "string_match_part"} == {"qa_1", "qa_2"}
    assert {spec.metric for spec in ruler.TASKS.values()} == {"string_match_all", "string_match_part"}
    assert list(ruler.TASKS) == [*niah, "vt", "cwe", "fwe", "qa_1", "qa_2"]


def test_word_lists_hold_no_word_inside_another():
    words = ruler.SINGLE_WORDS
    assert len(words) == len(set(words)) == len(ruler.ADJECTIVES) + len(ruler.NOUNS) + len(ruler.VERBS)
    assert all(re.fullmatch("[a-z]+", word) for word in words)
    assert [(a, b) for a in words for b in words if a != b and a in b] == []
    assert ruler.COMPOUND_WORDS == len({ruler.compound_word(n) for n in range(ruler.COMPOUND_WORDS)})
    assert ruler.compound_word(0) == f"{ruler.ADJECTIVES[0]}-{ruler.NOUNS[0]}"


def test_zeta_and_the_depths():
    assert ruler.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-13)
    assert ruler.zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-12)
    assert ruler.zeta(1.5) == pytest.approx(2.612375348685488, rel=1e-10)
    assert len(ruler.DEPTHS) == 40 and ruler.DEPTHS[:4] == (0, 3, 5, 8) and ruler.DEPTHS[-2:] == (97, 100)


@pytest.mark.parametrize("measure, budget, lowest, highest, expected", [
    (lambda n: 3 * n + 10, 100, 1, None, 30),
    (lambda n: 3 * n + 10 + (n % 5 == 0), 100, 1, None, 29),   # 30 is one token too long; 29 fits
    (lambda n: 20 * (n // 7) + 5, 100, 2, None, 34),
    (lambda n: n * n, 10_000_000, 1, None, 3162),
    (lambda n: 50 + n, 40, 1, None, None),                      # even the smallest does not fit
    (lambda n: 7 * n, 7, 1, None, 1),
    (lambda n: 3 * n + 10, 100, 1, 12, 12),                     # no more material than 12 units
    (lambda n: 60, 100, 2, 40, 40),                             # the prompt stops growing: no endless search
    (lambda n: 3 * n + 10, 100, 1, 30, 30),
])
def test_largest_fitting_finds_the_boundary(measure, budget, lowest, highest, expected):
    calls = []
    found = ruler.largest_fitting(lambda n: calls.append(n) or measure(n), budget, lowest, highest)
    assert found == expected
    assert len(calls) < 45 and (highest is None or max(calls) <= highest)


# --- the generators --------------------------------------------------------------------------------------------

def chat_prompt(text, prefix):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{prefix}"


def check_length(tokenizer, record, ids, length, unit_tokens):
    """The prompt fits with the answer's room, and one more haystack unit would not have."""
    room = ruler.TASKS[record["task"]].max_new_tokens
    assert len(ids) + room <= length
    assert length - (len(ids) + room) < unit_tokens, (record["task"], len(ids), unit_tokens)
    assert tokenizer.decode(ids) == chat_prompt(record["input"], record["answer_prefix"])


NIAH = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery"]


@pytest.mark.parametrize("task", NIAH)
def test_needles_are_where_the_sample_says(tokenizer, sources, essays, task):
    spec = ruler.TASKS[task]
    record, ids = ruler.make_sample(tokenizer, task, LENGTH, 3, seed=7, sources=sources)
    text, needles = record["input"], record["needles"]
    value_type = spec.value_type
    singular = value_type[:-1]
    plural = spec.values * spec.queries > 1
    key_pattern = {"words": "[a-z]+-[a-z]+", "uuids": UUID}[spec.key_type]
    value_pattern = {"numbers": NUMBER, "uuids": UUID}[value_type]
    assert len(needles) == spec.keys * spec.values
    for needle in needles:
        assert text[needle["offset"] : needle["offset"] + len(needle["text"])] == needle["text"]
        assert needle["text"] == f"One of the special magic {value_type} for {needle['key']} is: {needle['value']}."
        assert re.fullmatch(key_pattern, needle["key"]) and re.fullmatch(value_pattern, needle["value"])
        assert text.count(needle["text"]) == 1
    if spec.key_type == "words":
        assert all(key.split("-")[0] in ruler.ADJECTIVES and key.split("-")[1] in ruler.NOUNS
                   for key in {needle["key"] for needle in needles})
    assert len({needle["key"] for needle in needles}) == spec.keys
    query = record["query"]
    assert len(query) == spec.queries == len(set(query))
    expected = [needle["value"] for key in query for needle in needles if needle["key"] == key]
    assert sorted(record["outputs"]) == sorted(expected) and len(record["outputs"]) == spec.queries * spec.values
    asked = query[0] if len(query) == 1 else ", ".join(query[:-1]) + ", and " + query[-1]
    if plural:
        opening = (f"Some special magic {value_type} are hidden within the following text. Make sure to memorize it."
                   f" I will quiz you about the {value_type} afterwards.\n")
        question = f"\nWhat are all the special magic {value_type} for {asked} mentioned in the provided text?"
        prefix = f" The special magic {value_type} for {asked} mentioned in the provided text are"
    else:
        opening = (f"A special magic {singular} is hidden within the following text. Make sure to memorize it."
                   f" I will quiz you about the {singular} afterwards.\n")
        question = f"\nWhat is the special magic {singular} for {asked} mentioned in the provided text?"
        prefix = f" The special magic {singular} for {asked} mentioned in the provided text is"
    assert text.startswith(opening) and text.endswith(question) and record["answer_prefix"] == prefix
    context = text[len(opening) : len(text) - len(question)]
    needle_texts = [needle["text"] for needle in needles]
    if spec.haystack == "noise":
        lines = context.split("\n")
        assert {line for line in lines if line not in needle_texts} == {ruler.NOISE}
        unit = count(tokenizer, "\n" + ruler.NOISE)
    elif spec.haystack == "needle":
        lines = context.split("\n")
        distractors = [line for line in lines if line not in needle_texts]
        assert len(distractors) > 5
        pattern = rf"One of the special magic {value_type} for ({key_pattern}) is: {value_pattern}\."
        assert all(re.fullmatch(pattern, line) for line in distractors)
        real_keys = {needle["key"] for needle in needles}
        assert not real_keys & {re.fullmatch(pattern, line).group(1) for line in distractors}
        unit = max(count(tokenizer, "\n" + line) for line in distractors)
    else:
        essay_words = "\n".join(path.read_text() for path in sorted(essays.glob("*.txt"))).split()
        haystack = context
        for needle_text in needle_texts:
            haystack = haystack.replace(needle_text, "")
        words = haystack.split()
        assert words == essay_words[: len(words)]
        for needle in needles:  # needles stand between sentences, or after the last words kept
            before, after = text[: needle["offset"]], text[needle["offset"] + len(needle["text"]) :]
            for needle_text in needle_texts:
                after = after.replace(needle_text, "")
            assert (before == opening or after.strip() == question.strip()
                    or (before.endswith(" ") and before[:-1].endswith(ENDINGS + tuple(needle_texts))))
        unit = max(count(tokenizer, " " + word) for word in essay_words) + 3
    check_length(tokenizer, record, ids, LENGTH, unit)


def test_variable_chain_and_its_worked_example(tokenizer, sources):
    record, ids = ruler.make_sample(tokenizer, "vt", LENGTH, 0, seed=5, sources=sources)
    text, names, value = record["input"], record["outputs"], record["query"]
    assert len(names) == 5 == len(set(names)) and all(re.fullmatch("[A-Z]{5}", name) for name in names)
    assert re.fullmatch("[0-9]{5}", value)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]} " for i in range(1, 5)]
    assert [needle["text"] for needle in record["needles"]] == statements
    offsets = [needle["offset"] for needle in record["needles"]]
    assert offsets == sorted(offsets)
    for needle in record["needles"]:
        assert text[needle["offset"] : needle["offset"] + len(needle["text"])] == needle["text"]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    assert text.startswith(intro) and text.count(intro) == 2
    example, task_text = text.split("\n\n" + intro)
    task_text = intro + task_text
    assert task_text.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")
    assert record["answer_prefix"] == (" Answer: According to the chain(s) of variable assignment in the text above,"
                                       f" 5 variables are assigned the value {value}, they are: ")
    # the worked example: its own chain of 3-letter names, answered, within 500 tokens before its answer
    shown = re.search(r"they are:  ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})$", example)
    example_names = shown.groups()
    example_value = re.search(r"assigned the value ([0-9]{5}) in the text above", example).group(1)
    assert f"\nVAR {example_names[0]} = {example_value}\n" in example
    assert all(f"\nVAR {new} = VAR {old} \n" in example for old, new in zip(example_names, example_names[1:]))
    assert count(tokenizer, example[: shown.start(1) - 1]) <= 500
    assert value not in example
    lines = task_text[len(intro) :].split("\n")[:-1]
    assert {line for line in lines if line not in statements} == {ruler.NOISE}
    check_length(tokenizer, record, ids, LENGTH, count(tokenizer, "\n" + ruler.NOISE))


@pytest.mark.parametrize("length, example_repeats, repeats, pattern", [
    (LENGTH, (20, 3, 1), (6, 1), "[a-z]+"),   # below 4,096 tokens RULER repeats less
    (4096, (40, 10, 3), (30, 3), "[a-z]+"),
    (16000, (40, 10, 3), (30, 3), "[a-z]+-[a-z]+"),  # more than the single words can fill: adjective-noun words
])
def test_common_words_repeat_as_ruler_sets_them(tokenizer, sources, length, example_repeats, repeats, pattern):
    record, ids = ruler.make_sample(tokenizer, "cwe", length, 1, seed=3, sources=sources)
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones"
    example, task_text = record["input"].split("\n" + head)
    assert example.startswith(head)
    question = "\nQuestion: What are the 10 most common words in the above list?"
    listed = re.findall(r"(\d+)\. ([a-z-]+)", task_text[: task_text.index(question)])
    assert [int(number) for number, _ in listed] == list(range(1, len(listed) + 1))
    counts = collections.Counter(word for _, word in listed)
    common = record["outputs"]
    assert len(common) == 10 and {counts[word] for word in common} == {repeats[0]}
    assert {n for word, n in counts.items() if word not in common} == {repeats[1]}
    assert all(re.fullmatch(pattern, word) for word in counts)
    if pattern == "[a-z]+":
        assert set(counts) <= set(ruler.SINGLE_WORDS)
    else:
        assert len(counts) < len(ruler.SINGLE_WORDS) and all(word.split("-")[0] in ruler.ADJECTIVES for word in counts)
    example_list, example_answer = example.split(ruler.CWE_PREFIX)
    example_counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", example_list))
    assert len(example_counts) == example_repeats[0]
    answer = re.findall(r"\d+\. ([a-z]+)", example_answer)
    assert {example_counts[word] for word in answer} == {example_repeats[1]} and len(answer) == 10
    assert {n for word, n in example_counts.items() if word not in answer} == {example_repeats[2]}
    assert record["answer_prefix"] == " Answer: The top 10 words that appear most often in the list are:"
    check_length(tokenizer, record, ids, length, repeats[1] * max(count(tokenizer, f" {len(listed)}. {word}")
                                                                  for word in counts) + 4)


def test_frequent_words_follow_zipf(tokenizer, sources):
    record, ids = ruler.make_sample(tokenizer, "fwe", LENGTH, 2, seed=3, sources=sources)
    opening = "Find the three most frequently appeared coded words. "
    text = record["input"]
    coded = text[text.index(opening) + len(opening) : text.index("\nQuestion: Do not provide any explanation.")]
    ranked = collections.Counter(coded.split()).most_common()
    assert ranked[0][0] == "..." and all(re.fullmatch("[a-z]{6}", word) for word, _ in ranked[1:])
    assert [word for word, _ in ranked[1:4]] == record["outputs"] and ranked[3][1] > ranked[4][1]
    assert len(ranked) <= (LENGTH - 50) // 50
    for rank, (_, n) in enumerate(ranked[:6], start=1):  # a Zipf law of exponent 2: n_k ~ n_1 / k^2
        assert abs(n - ranked[0][1] / rank ** 2) <= 1
    assert record["answer_prefix"] == (" Answer: According to the coded text above, the three most frequently"
                                       " appeared words are:")
    check_length(tokenizer, record, ids, LENGTH, 6 * count(tokenizer, " " + ranked[1][0]))


def test_squad_question_with_its_paragraph_among_others(tokenizer, sources):
    record, ids = ruler.make_sample(tokenizer, "qa_1", LENGTH, 1, seed=3, sources=sources)
    # index 1: the second answerable question (the moon's is unanswerable and left out, as RULER)
    assert record["query"] == "When is the sky blue?" and record["outputs"] == ["at noon"]
    (gold,) = record["documents"]
    text = record["input"]
    assert f"Document {gold}:\nThe sky above the harbor is blue at noon." in text
    numbers = [int(n) for n in re.findall(r"Document (\d+):\n", text)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 10
    assert "The grass in the valley is green all year." in text  # its article's other paragraph comes first
    assert text.startswith("Answer the question based on the given documents. Only give me the answer and do not"
                           " output any other words.\n\nThe following are given documents.\n\nDocument 1:\n")
    assert text.endswith("\n\nQuestion: When is the sky blue?") and record["answer_prefix"] == " Answer:"
    documents = [paragraph["context"] for article in SQUAD["data"] for paragraph in article["paragraphs"]]
    check_length(tokenizer, record, ids, LENGTH, max(count(tokenizer, f"\n\nDocument 99:\n{d}") for d in documents))


def test_documents_come_in_random_order(tokenizer, sources):
    gold = {ruler.make_sample(tokenizer, "qa_1", LENGTH, 0, seed=seed, sources=sources)[0]["documents"][0]
            for seed in range(6)}
    assert len(gold) > 2  # the question's own paragraph moves about


def test_distractor_needles_never_carry_a_real_key():
    task = ruler.Niah("needle", "words", "numbers")
    # every key but one in a thousand is real: a distractor drawn blindly would almost always collide
    real = [ruler.compound_word(number) for number in range(ruler.COMPOUND_WORDS) if number % 1000]
    drawn = {"needles": [(key, "1234567") for key in real], "distractor_seed": 3}
    lines = [text for text, _ in task.distractors(drawn, 40)]
    keys = {re.fullmatch(r"One of the special magic numbers for (\S+) is: \d{7}\.", line).group(1) for line in lines}
    assert len(lines) == 40 and not keys & set(real)
    assert [text for text, _ in task.distractors(drawn, 25)] == lines[:25]  # n distractors start n + 1 of them


def test_hotpotqa_question_with_all_its_paragraphs(tokenizer, sources):
    record, ids = ruler.make_sample(tokenizer, "qa_2", LENGTH, 4, seed=3, sources=sources)
    item = HOTPOT[4]
    assert record["query"] == item["question"] and record["outputs"] == [item["answer"]]
    shown = {int(number): text for number, text in re.findall(r"Document (\d+):\n(Title [^\n]*\n[^\n]*)",
                                                                 record["input"])}
    assert sorted(shown[number] for number in record["documents"]) == sorted(
        f"{title}\n{''.join(sentences)}" for title, sentences in item["context"])


def test_qa_needs_its_folder_and_file(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="qa_1 needs SQuAD 2.0's dev-v2.0.json saved as squad.json .*pass --qa_dir"):
        ruler.make_sample(tokenizer, "qa_1", LENGTH, 0, sources=ruler.Sources())
    (tmp_path / "squad.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no hotpotqa.json in '.*' \(qa_2 needs HotpotQA's hotpot_dev_"
                                                r"distractor_v1.json saved as hotpotqa.json.*it holds: squad.json"):
        ruler.Sources(qa_dir=tmp_path).check(["qa_2"])
    with pytest.raises(ValueError, match="squad.json is not a SQuAD 2.0's dev-v2.0.json file"):
        ruler.Sources(qa_dir=tmp_path).check(["qa_1"])
    with pytest.raises(FileNotFoundError, match="QA folder '/nonexistent/qa' does not exist"):
        ruler.Sources(qa_dir="/nonexistent/qa").check(["qa_1"])


def test_a_length_too_short_is_named(tokenizer, sources):
    with pytest.raises(ValueError, match=r"length 300 is too short for niah_single_1: its smallest prompt takes \d+ "
                                         r"tokens with this tokenizer, and the answer 128 more"):
        ruler.make_sample(tokenizer, "niah_single_1", 300, 0, sources=sources)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_the_same_seed_gives_the_same_sample_and_another_seed_another(tokenizer, sources, task):
    first = ruler.make_sample(tokenizer, task, LENGTH, 2, seed=11, sources=sources)
    again = ruler.make_sample(tokenizer, task, LENGTH, 2, seed=11, sources=ruler.Sources(sources.haystack_dir,
                                                                                          sources.qa_dir))
    assert first == again
    other_seed = ruler.make_sample(tokenizer, task, LENGTH, 2, seed=12, sources=sources)
    other_index = ruler.make_sample(tokenizer, task, LENGTH, 3, seed=11, sources=sources)
    assert other_seed[0]["input"] != first[0]["input"] and other_index[0]["input"] != first[0]["input"]
    assert first[0]["_id"] == f"{task}-{LENGTH}-seed11-2" != other_seed[0]["_id"]


def test_keys_and_values_are_the_same_on_every_machine(tokenizer, sources):
    """Keys and values are drawn before any tokenizer is used: pinned here against Python's seeded random."""
    record, _ = ruler.make_sample(tokenizer, "niah_single_1", LENGTH, 0, seed=42, sources=sources)
    assert (record["query"], record["outputs"]) == (["glad-moose"], ["5557468"])
    record, _ = ruler.make_sample(tokenizer, "vt", LENGTH, 0, seed=42, sources=sources)
    assert (record["query"], record["outputs"]) == ("70171", ["KFBLR", "GXQID", "IKXAJ", "QFFNP", "LQCDF"])


def test_without_chat_the_task_and_prefix_run_together(tokenizer, sources):
    record, ids = ruler.make_sample(tokenizer, "niah_single_1", LENGTH, 0, chat=False, sources=sources)
    assert tokenizer.decode(ids) == record["input"] + record["answer_prefix"]
    assert LENGTH - count(tokenizer, "\n" + ruler.NOISE) < len(ids) + 128 <= LENGTH


# --- metrics -------------------------------------------------------------------------------------------------

def test_string_match_on_hand_computed_cases():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.string_match_all("APPLE pie", ["apple"]) == 1.0
    assert ruler.string_match_all("", ["a"]) == 0.0
    assert ruler.string_match_part("Paris, France", ["PARIS", "Lyon"]) == 1.0
    assert ruler.string_match_part("Berlin", ["Paris", "Lyon"]) == 0.0
    records = [{"pred": "123 then 456", "outputs": ["123", "456", "789"]},
               {"pred": "nothing", "outputs": ["1"]},
               {"pred": "x 1 y", "outputs": ["1"]}]
    assert ruler.task_score("niah_multivalue", records) == 55.56  # (2/3 + 0 + 1) / 3
    assert ruler.task_score("qa_1", records) == 66.67  # (1 + 0 + 1) / 3: any reference will do
    assert ruler.task_score("qa_2", [{"pred": "yes", "answers": "yes"}, {"pred": "no", "answers": ["yes"]}]) == 50.0
    assert ruler.task_score("vt", []) is None


# --- RULER files as KVCache-Factory ships them -----------------------------------------------------------------

NIAH_INPUT = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you"
              " about the number afterwards.\nThe grass is green.\nOne of the special magic numbers for calm-otter is:"
              " 1234567.\nWhat is the special magic number for calm-otter mentioned in the provided text?")
NIAH_PREFIX = " The special magic number for calm-otter mentioned in the provided text is"
VT_INPUT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\nVAR ABCDE = 12345"
            "\nQuestion: Find all variables that are assigned the value 12345 in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, 1 variables are assigned"
             " the value 12345, they are: ")


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_kvcache_factory_files_are_read_with_their_answer_prefix_split_off(tmp_path):
    write_jsonl(tmp_path / "4096" / "niah_single_1.jsonl", [
        {"index": 0, "input": NIAH_INPUT + NIAH_PREFIX, "outputs": ["1234567"], "length": 3181},
        {"index": 1, "input": NIAH_INPUT, "answer_prefix": NIAH_PREFIX, "outputs": ["1234567"], "length": 3000},
    ])
    write_jsonl(tmp_path / "4096" / "vt.jsonl", [{"index": 7, "input": VT_INPUT + VT_PREFIX, "outputs": ["ABCDE"],
                                                   "length": 90}])
    first, second = ruler.read_task_file(ruler.data_file(tmp_path, 4096, "niah_single_1"), "niah_single_1", 4096)
    assert (first["input"], first["answer_prefix"], first["length"]) == (NIAH_INPUT, NIAH_PREFIX, 3181)
    assert (first["_id"], first["task"], first["outputs"]) == ("niah_single_1-4096-record1", "niah_single_1",
                                                               ["1234567"])
    assert (second["input"], second["answer_prefix"]) == (NIAH_INPUT, NIAH_PREFIX)
    assert second["_id"] == "niah_single_1-4096-record2"
    (vt,) = ruler.read_task_file(ruler.data_file(tmp_path, 4096, "vt"), "vt", 4096)
    assert (vt["input"], vt["answer_prefix"], vt["_id"]) == (VT_INPUT, VT_PREFIX, "vt-4096-record1")
    assert ruler.split_answer_prefix("cwe", "no prefix here") == ("no prefix here", "")
    with pytest.raises(FileNotFoundError, match=r"no cwe.jsonl in '.*4096'; it holds: niah_single_1.jsonl, vt.jsonl"):
        ruler.data_file(tmp_path, 4096, "cwe")
    with pytest.raises(FileNotFoundError, match=r"no folder 8192 in '.*'; it holds lengths: 4096"):
        ruler.data_file(tmp_path, 8192, "vt")
    with pytest.raises(FileNotFoundError, match="RULER data folder '/nonexistent/RULER' does not exist"):
        ruler.data_file("/nonexistent/RULER", 4096, "vt")
    write_jsonl(tmp_path / "4096" / "fwe.jsonl", [{"index": 0, "input": "x"}])
    with pytest.raises(ValueError, match="record 1 lacks outputs; RULER records need input, outputs"):
        ruler.read_task_file(tmp_path / "4096" / "fwe.jsonl", "fwe", 4096)


# --- run_ruler.py on a tiny Llama --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_chat_llama(tmp_path_factory.mktemp("tiny-ruler-llama"), tokenizer, max_positions=2048)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return ntkkv.load_model(str(model_dir))


def run_script():
    return load_script("run_ruler.py")


def run_cli(*arguments):
    run_script().main([str(argument) for argument in arguments])


def cli_arguments(model_dir, essays, save_dir, *extra, method="SnapKV", budget=16):
    return ["--method", method, "--model_path", model_dir, "--save_dir", save_dir, "--haystack_dir", essays,
            "--max_capacity_prompts", budget, "--model_name", "tiny", *extra]


def by_id(path):
    return {record["_id"]: record for record in read_jsonl(path)}


def test_run_writes_samples_predictions_and_kept_kv(model_dir, essays, tiny, tmp_path, capsys):
    _, tokenizer = tiny
    run_cli(*cli_arguments(model_dir, essays, tmp_path, "--tasks", "vt,fwe", "--lengths", 1200, 1300,
                           "--num_samples", 2))
    for length in (1200, 1300):
        for task, room in (("vt", 30), ("fwe", 50)):
            records = by_id(tmp_path / "tiny_16" / str(length) / task / "SnapKV.json")
            assert sorted(records) == [f"{task}-{length}-seed42-{index}" for index in range(2)]
            for index in range(2):
                written = records[f"{task}-{length}-seed42-{index}"]
                sample, ids = ruler.make_sample(tokenizer, task, length, index, seed=42,
                                                sources=ruler.Sources(essays))
                for key, value in sample.items():
                    assert written[key] == value, key
                assert written["prompt_tokens"] == len(ids) and len(ids) + room <= length
                assert 1 <= written["answer_tokens"] <= room and isinstance(written["pred"], str)
                assert written["kv_kept"] == [16, 16] and written["kv_state"] == [0.0, 0.0]
                assert written["batch_size"] == 1 and written["decode"] == "dynamic" and written["seconds"] >= 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "8 new samples over 2 tasks x 2 lengths" in summary and "mean kept K/V per layer 16.0" in summary


@pytest.mark.parametrize("method", ["FullKV", "SnapKV"])
def test_batch_of_three_predicts_what_batch_of_one_does(model_dir, essays, tmp_path, method):
    for batch_size in (1, 3):
        run_cli(*cli_arguments(model_dir, essays, tmp_path / f"b{batch_size}", "--tasks", "niah_single_2",
                               "--lengths", 900, "--num_samples", 3, "--eval_batch_size", batch_size, method=method))
    one = by_id(tmp_path / "b1" / "tiny_16" / "900" / "niah_single_2" / f"{method}.json")
    three = by_id(tmp_path / "b3" / "tiny_16" / "900" / "niah_single_2" / f"{method}.json")
    assert len(one) == 3 and {record["batch_size"] for record in three.values()} == {3}
    for sample_id in one:
        for key in ("pred", "answer_tokens", "kv_kept", "prompt_tokens", "input"):
            assert one[sample_id][key] == three[sample_id][key], (sample_id, key)
    if method == "FullKV":
        assert all(record["kv_kept"] == [record["prompt_tokens"]] * 2 for record in one.values())


def test_rerun_after_a_kill_builds_and_answers_only_what_is_missing(tiny, essays, tmp_path, monkeypatch):
    model, tokenizer = tiny
    settings = GenerationSettings(method="SnapKV", max_capacity_prompts=16)
    sources = ruler.Sources(essays)
    stubs = ruler.sample_stubs("vt", VT_LENGTH, 4, seed=42)
    reference = tmp_path / "reference.json"
    ruler.run_task(model, tokenizer, "vt", VT_LENGTH, stubs, str(reference), settings, sources=sources)

    real_generate_batch, calls = longbench_run.generate_batch, []

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate_batch(*args, **kwargs)

    output = tmp_path / "SnapKV.json"
    monkeypatch.setattr(longbench_run, "generate_batch", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        ruler.run_task(model, tokenizer, "vt", VT_LENGTH, stubs, str(output), settings, sources=sources)
    monkeypatch.undo()
    written_before = output.read_bytes()
    assert written_before.count(b"\n") == 2
    with open(output, "ab") as handle:
        handle.write(b'{"pred": "half a li')  # a kill in the middle of a write

    real_make_sample, built = ruler.make_sample, []
    monkeypatch.setattr(ruler, "make_sample", lambda *args, **kwargs: built.append(args[3]) or
                        real_make_sample(*args, **kwargs))
    ruler.run_task(model, tokenizer, "vt", VT_LENGTH, stubs, str(output), settings, sources=sources)
    assert len(built) == 2  # only the two samples not written were built
    assert output.read_bytes().startswith(written_before)
    records = read_jsonl(output)
    assert len(records) == 4 and len({record["_id"] for record in records}) == 4
    assert {r["_id"]: r["pred"] for r in records} == {r["_id"]: r["pred"] for r in read_jsonl(reference)}


def test_ruler_files_run_with_the_chat_template_or_without(model_dir, essays, tiny, tmp_path):
    _, tokenizer = tiny
    samples = [ruler.make_sample(tokenizer, "vt", VT_LENGTH, index, sources=ruler.Sources(essays))[0]
               for index in range(2)]
    files = tmp_path / "RULER"
    write_jsonl(files / str(VT_LENGTH) / "vt.jsonl", [{"index": s["index"], "input": s["input"] + s["answer_prefix"],
                                              "outputs": s["outputs"], "length": 640} for s in samples])
    run_cli(*cli_arguments(model_dir, essays, tmp_path / "chat", "--data_dir", files, "--tasks", "vt",
                           "--lengths", VT_LENGTH))
    run_cli(*cli_arguments(model_dir, essays, tmp_path / "raw", "--data_dir", files, "--tasks", "vt",
                           "--lengths", VT_LENGTH, "--no_chat_template", "--num_samples", 1))
    chat = by_id(tmp_path / "chat" / "tiny_16" / str(VT_LENGTH) / "vt" / "SnapKV_files.json")
    raw = by_id(tmp_path / "raw" / "tiny_16" / str(VT_LENGTH) / "vt" / "SnapKV_nochat_files.json")
    assert sorted(chat) == [f"vt-{VT_LENGTH}-record1", f"vt-{VT_LENGTH}-record2"]
    assert sorted(raw) == [f"vt-{VT_LENGTH}-record1"]
    for sample in samples:
        written = chat[f"vt-{VT_LENGTH}-record{sample['index'] + 1}"]
        assert (written["input"], written["answer_prefix"]) == (sample["input"], sample["answer_prefix"])
        assert (written["outputs"], written["length"]) == (sample["outputs"], 640)
        assert written["prompt_tokens"] == len(tokenizer(chat_prompt(sample["input"], sample["answer_prefix"]),
                                                         add_special_tokens=False)["input_ids"])
    raw_text = samples[0]["input"] + samples[0]["answer_prefix"]
    assert raw[f"vt-{VT_LENGTH}-record1"]["prompt_tokens"] == count(tokenizer, raw_text)


@pytest.mark.parametrize("change, message", [
    (["--tasks", "vt,niah_single_9"], "unknown RULER task 'niah_single_9'; choose from: niah_single_1, "),
    (["--lengths", "4096"], r"length 4096 exceeds the model's maximum of 2048 tokens; choose --lengths <= 2048"),
    (["--lengths", "0"], "lengths must be positive numbers of tokens, got 0"),
    (["--tasks", "qa_1"], r"qa_1 needs SQuAD 2.0's dev-v2.0.json saved as squad.json .*: pass --qa_dir"),
    (["--tasks", "qa_2", "--qa_dir", "/nonexistent/qa"], "QA folder '/nonexistent/qa' does not exist"),
    (["--tasks", "niah_single_2", "--haystack_dir", "/nonexistent/essays"],
     "haystack folder '/nonexistent/essays' does not exist"),
    (["--data_dir", "/nonexistent/RULER"], "RULER data folder '/nonexistent/RULER' does not exist"),
    (["--max_capacity_prompts", "4"], "max_capacity_prompt must be an integer larger than window_size=8"),
    (["--max_capacity_prompts", "-1"], "max_capacity_prompts is -1 and max_capacity_prompts_ratio is unset"),
    (["--method", "snapKV2"], "unknown method 'snapKV2'; choose one of: "),
    (["--model_path", "/nonexistent/model"], "'/nonexistent/model' does not exist"),
])
def test_bad_input_stops_before_the_model_loads_and_writes_nothing(model_dir, essays, tmp_path, monkeypatch,
                                                                    change, message):
    script = run_script()

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script, "load_model", load_model)
    arguments = [str(a) for a in cli_arguments(model_dir, essays, tmp_path / "out", "--tasks", "vt", "--lengths", 700)]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in arguments:
            arguments[arguments.index(flag) + 1] = value
        else:
            arguments += [flag, value]
    with pytest.raises(SystemExit, match=message) as stopped:
        script.main(arguments)
    assert str(stopped.value).startswith("run_ruler.py: error: ") and "\n" not in str(stopped.value)
    assert not (tmp_path / "out").exists()


def test_a_length_too_short_for_a_task_stops_before_anything_is_written(model_dir, essays, tmp_path):
    with pytest.raises(SystemExit, match="run_ruler.py: error: length 200 is too short for niah_single_1"):
        run_cli(*cli_arguments(model_dir, essays, tmp_path / "out", "--tasks", "niah_single_1,fwe,vt",
                               "--lengths", 1200, 200))
    assert not (tmp_path / "out").exists()


# --- eval.py --ruler ------------------------------------------------------------------------------------------------

def eval_main(*arguments):
    spec = importlib.util.spec_from_file_location("ntkkv_script_eval_ruler", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(argument) for argument in arguments])


def test_eval_scores_a_results_folder_into_results_csv(tmp_path, capsys):
    group = tmp_path / "tiny_16"
    write_jsonl(group / "4096" / "niah_multivalue" / "FullKV.json", [
        {"_id": "a", "pred": " 11, 22 and 33", "outputs": ["11", "22", "33", "44"]},  # 3/4
        {"_id": "b", "pred": "", "outputs": ["55"]},                                  # 0
    ])
    write_jsonl(group / "4096" / "niah_multivalue" / "SnapKV.json", [{"_id": "a", "pred": "44", "outputs": ["44"]}])
    write_jsonl(group / "4096" / "qa_1" / "FullKV.json", [
        {"_id": "c", "pred": "Paris", "outputs": ["paris", "lyon"]}, {"_id": "d", "pred": "no", "outputs": ["x"]},
        {"_id": "e", "pred": "in Lyon", "answers": ["lyon"]},
    ])
    write_jsonl(group / "8192" / "niah_multivalue" / "FullKV.part0.jsonl", [{"_id": "f", "pred": "", "outputs": ["1"]}])
    eval_main("--results_dir", tmp_path, "--ruler")
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["method", "length", "niah_multivalue", "qa_1", "average"],
        ["tiny_16/FullKV", "4096", "37.5", "66.67", "52.09"],     # (37.5 + 66.67) / 2 = 52.085
        ["tiny_16/FullKV", "8192", "0.0", "", "0.0"],
        ["tiny_16/SnapKV", "4096", "100.0", "", "100.0"],
    ]
    metrics = json.loads((group / "4096" / "niah_multivalue" / "metrics.json").read_text())
    assert metrics == {"FullKV": {"score": 37.5, "samples": 2, "metric": "string_match_all", "empty": 1},
                       "SnapKV": {"score": 100.0, "samples": 1, "metric": "string_match_all", "empty": 0}}
    assert json.loads((group / "4096" / "qa_1" / "metrics.json").read_text())["FullKV"]["metric"] == "string_match_part"
    assert "tiny_16/FullKV" in capsys.readouterr().out
    eval_main("--results_dir", group / "4096", "--ruler")  # a length folder alone: rows are the methods
    with open(group / "4096" / "results.csv", newline="") as handle:
        assert [row[:2] for row in csv.reader(handle)] == [["method", "length"], ["FullKV", "4096"],
                                                            ["SnapKV", "4096"]]
    with pytest.raises(SystemExit, match=r"no prediction files under .* \(expected \.\.\./\{length\}/\{task\}/"):
        eval_main("--results_dir", tmp_path / "tiny_16" / "4096" / "qa_1", "--ruler")
    with pytest.raises(SystemExit, match="--baseline compares LongBench datasets; leave out --ruler"):
        eval_main("--results_dir", tmp_path, "--ruler", "--baseline", "FullKV")


def test_run_then_eval_end_to_end(model_dir, essays, tmp_path):
    run_cli(*cli_arguments(model_dir, essays, tmp_path, "--tasks", "vt", "--lengths", VT_LENGTH, "--num_samples", 2,
                           method="FullKV"))
    eval_main("--results_dir", tmp_path, "--ruler")
    metrics = json.loads((tmp_path / "tiny_16" / str(VT_LENGTH) / "vt" / "metrics.json").read_text())
    records = read_jsonl(tmp_path / "tiny_16" / str(VT_LENGTH) / "vt" / "FullKV.json")
    expected = round(100 * sum(sum(name.lower() in r["pred"].lower() for name in r["outputs"]) / 5
                               for r in records) / 2, 2)
    assert metrics["FullKV"]["score"] == expected and metrics["FullKV"]["samples"] == 2


# --- the embedded SmolLM2 (slow) --------------------------------------------------------------------------------

def test_every_task_fills_4096_tokens_of_smollm2(smollm2):
    _, tokenizer = smollm2
    sources = ruler.Sources()
    for task in ruler.SYNTHETIC_TASKS:
        record, ids = ruler.make_sample(tokenizer, task, 4096, 0, sources=sources)
        room = ruler.TASKS[task].max_new_tokens
        unit = 90 if task == "niah_multikey_3" else 40  # SmolLM2 spends up to 85 tokens on a needle of two UUIDs
        assert 4096 - unit < len(ids) + room <= 4096, task
        text = tokenizer.decode(ids)
        assert text.endswith("<|im_start|>assistant\n" + record["answer_prefix"]) and record["input"] in text


def test_records_whose_index_repeats_are_all_kept(tmp_path):
    """RULER's own niah files put the answer's offset in `index`, which repeats: records are told apart by
    their place in the file."""
    write_jsonl(tmp_path / "4096" / "niah_single_1.jsonl",
                [{"index": 250, "input": NIAH_INPUT + NIAH_PREFIX, "outputs": [str(n)], "length": 4096}
                 for n in range(3)])
    records = ruler.read_task_file(ruler.data_file(tmp_path, 4096, "niah_single_1"), "niah_single_1", 4096)
    assert len({record["_id"] for record in records}) == 3
    write_jsonl(tmp_path / "4096" / "vt.jsonl", [{"index": 0, "input": "x", "outputs": []}])
    with pytest.raises(ValueError, match=r"record 1's outputs must be a non-empty list of strings, got \[\]"):
        ruler.read_task_file(tmp_path / "4096" / "vt.jsonl", "vt", 4096)
    assert ruler.string_match_all("anything", []) == 0.0


def test_runs_of_other_seeds_or_templates_go_to_their_own_files(model_dir, essays, tmp_path):
    for extra in ([], ["--seed", "7"], ["--no_chat_template"]):
        run_cli(*cli_arguments(model_dir, essays, tmp_path, "--tasks", "vt", "--lengths", VT_LENGTH,
                               "--num_samples", 1, *extra))
    folder = tmp_path / "tiny_16" / str(VT_LENGTH) / "vt"
    assert sorted(path.name for path in folder.glob("*.json")) == ["SnapKV.json", "SnapKV_nochat.json",
                                                                   "SnapKV_seed7.json"]
    assert all(len(read_jsonl(path)) == 1 for path in folder.glob("*.json"))


def test_every_pending_sample_is_built_before_anything_is_written(model_dir, essays, tmp_path, monkeypatch):
    """A sample that cannot fit, even a later one of a later task, stops the run before any file exists."""
    real = ruler.make_sample

    def make_sample(tokenizer, task, length, index, *args, **kwargs):
        if task == "niah_single_1" and index == 1:
            raise ValueError("length 1200 is too short for niah_single_1 (simulated)")
        return real(tokenizer, task, length, index, *args, **kwargs)

    monkeypatch.setattr(ruler, "make_sample", make_sample)
    with pytest.raises(SystemExit, match="too short for niah_single_1"):
        run_cli(*cli_arguments(model_dir, essays, tmp_path, "--tasks", "vt,niah_single_1", "--lengths", VT_LENGTH,
                               "--num_samples", 2))
    assert not any(tmp_path.rglob("*.json"))


@pytest.mark.slow  # one run_ruler.py process per method and budget
def test_the_grid_runs_every_method_at_every_budget_and_tabulates_the_scores(model_dir, essays, tmp_path):
    grid = load_script("benchmarks/ruler_grid.py")
    out = tmp_path / "table.md"
    with pytest.raises(SystemExit) as done:
        grid.main(["--model_path", str(model_dir), "--model_name", "tiny", "--lengths", "1200", "--num_samples", "1",
                   "--tasks", "vt", "--methods", "fullkv", "snapkv", "adakv+fitted", "--budgets", "16", "r0.5",
                   "--jobs", "2", "--save_dir", str(tmp_path / "runs"), "--out", str(out),
                   "--extra", "--haystack_dir", str(essays)])
    assert done.value.code == 0
    for folder, method in (("tiny_128", "fullkv"), ("tiny_16", "snapkv"), ("tiny_ratio0.5", "snapkv"),
                           ("tiny_16", "adakv_fitted"), ("tiny_ratio0.5", "adakv_fitted")):
        assert (tmp_path / "runs" / folder / "1200" / "vt" / f"{method}.json").is_file(), (folder, method)
    table = out.read_text()
    averages = table.split("each task")[0]
    for method in ("fullkv", "snapkv", "adakv_fitted"):
        row = next(line for line in averages.splitlines() if line.startswith(f"| {method} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert len(cells) == 2 and all(0 <= float(cell) <= 100 for cell in cells), row
