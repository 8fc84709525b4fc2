"""Needle in a haystack: haystack building, scoring, results and resume, heatmaps, the
attention notebook, and one real cell on the embedded SmolLM2."""

import importlib.util
import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from ntkkv import viz
from ntkkv.eval import needle
from tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
NEEDLE_SENTENCE = needle.DEFAULT_NEEDLE.strip()


def load_script(relative_path):
    """A script of the repository as a module, whatever the current directory."""
    spec = importlib.util.spec_from_file_location(Path(relative_path).stem, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2's tokenizer alone (a chat template, a real BPE; ~8 s)."""
    from transformers import AutoTokenizer

    from ntkkv.models import smollm2_path

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture
def essays(tmp_path):
    """A hand-made haystack: three essays of short numbered sentences (a period every ~8 tokens)."""
    folder = tmp_path / "essays"
    folder.mkdir()
    for name in "abc":
        sentences = [f"Essay {name} says thing number {i} about ships" for i in range(400)]
        (folder / f"{name}.txt").write_text(". ".join(sentences) + ".\n")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A two-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as an HF folder."""
    model = tiny_model("llama", layers=2)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    folder = tmp_path_factory.mktemp("tiny-needle")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    import ntkkv

    return ntkkv.load_model(str(tiny_dir))


# -- grids and bad input ---------------------------------------------------------------


def test_context_lengths_follow_the_seed_grid():
    assert needle.context_lengths(1000, 3000, 1000) == [1000, 2000, 3000]
    assert needle.context_lengths(1000, 7600, 1650) == [1000, 2650, 4300, 5950, 7600]
    assert needle.context_lengths(1000, 1999, 500) == [1000, 1500]


def test_depth_intervals_follow_the_seed_grid():
    assert needle.depth_percents(10) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert needle.depth_percents(5) == [0, 25, 50, 75, 100]


@pytest.mark.parametrize("args, words", [
    ((4000, 1000, 100), ["--s_len 4000", "--e_len 1000"]),
    ((1000, 2000, 0), ["--step", "0"]),
    ((100, 2000, 100), ["--s_len 100", "buffer"]),
])
def test_bad_grids_are_named(args, words):
    with pytest.raises(ValueError) as error:
        needle.context_lengths(*args)
    for word in words:
        assert word in str(error.value)


def test_depths_outside_0_100_are_refused():
    with pytest.raises(ValueError, match="120"):
        needle.check_depths([0, 50, 120])


def test_unknown_provider_names_the_allowed_ones():
    assert needle.normalize_provider("llama3") == "LLaMA3"
    assert needle.normalize_provider("Mistral") == "Mistral2"
    assert needle.normalize_provider("CHAT") == "chat"
    with pytest.raises(ValueError) as error:
        needle.normalize_provider("OpenAI")
    assert "'OpenAI'" in str(error.value)
    for allowed in ("LLaMA3", "Mistral2", "chat"):
        assert allowed in str(error.value)


def test_unknown_method_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        needle.NeedleTest([1000], [50], method="snapKV2")
    assert "'snapKV2'" in str(error.value) and "pyramidkv" in str(error.value)
    assert needle.NeedleTest([1000], [50], method="full").method == "fullkv"


@pytest.mark.parametrize("model_name, version", [
    ("smollm2", "smollm2_snapkv_128"),
    ("/models/Mistral-7B-Instruct-v0.2/", "Mistral-7B-Instruct-v0.2_snapkv_128"),
    ("weights/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1_snapkv_128"),
])
def test_default_results_folder_names_model_method_and_budget(model_name, version):
    assert needle.NeedleTest([1000], [50], method="snapkv", model_name=model_name).model_version == version


def test_missing_and_empty_haystack_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        needle.haystack_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty .txt"):
        needle.haystack_files(tmp_path / "empty")


def test_default_haystack_is_the_49_paul_graham_essays():
    files = needle.haystack_files(needle.default_haystack_dir())
    assert len(files) == 49
    assert "addiction.txt" in {f.name for f in files}


def test_a_context_longer_than_the_model_maximum_is_refused(tiny):
    model, _ = tiny
    needle.check_context_fits([1000, 4096], model)
    with pytest.raises(ValueError) as error:
        needle.check_context_fits([1000, 5000], model)
    assert "5000" in str(error.value) and "4096" in str(error.value)


@pytest.mark.parametrize("flags, message", [
    (["--s_len", "3000", "--e_len", "1000"], "--s_len 3000 is greater than --e_len 1000"),
    (["--s_len", "1000", "--e_len", "2000", "--model_provider", "GPT4"], "unknown model provider 'GPT4'"),
    (["--s_len", "1000", "--e_len", "2000", "--haystack_dir", "/no/such/essays"], "/no/such/essays"),
    (["--s_len", "1000", "--e_len", "2000", "--method", "fullkv", "snapKV2"], "unknown method 'snapKV2'"),
])
def test_cli_refuses_bad_input_before_loading_a_model(flags, message):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_script("run_needle_in_haystack.py").main(flags + ["--model_name", "/no/such/model"])
    assert message in str(error.value)


def refuse_to_load(script, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script, "load_model", load_model)
    return script


def test_cli_refuses_a_context_beyond_the_model_maximum_before_loading(tiny_dir, essays, tmp_path, monkeypatch):
    script = refuse_to_load(load_script("run_needle_in_haystack.py"), monkeypatch)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 4096"):
        script.main(["--s_len", "1000", "--e_len", "6000", "--step", "5000", "--model_name", str(tiny_dir),
                     "--haystack_dir", str(essays), "--save_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max_capacity_prompt", "4", "--method", "snapkv"], "larger than window_size=8 (or a list of one per layer), "
                                                            "got 4"),
    (["--max_capacity_prompts", "64", "--method", "snapkv", "--summary", "taylor2", "--state_budget", "0.5"],
     "summary 'taylor2': no layer's state budget holds a cluster"),
])
def test_cli_checks_budgets_against_the_model_before_loading(tiny_dir, essays, tmp_path, monkeypatch, flags, message):
    script = refuse_to_load(load_script("run_needle_in_haystack.py"), monkeypatch)
    with pytest.raises(ValueError) as error:
        script.main(["--s_len", "500", "--e_len", "500", "--model_name", str(tiny_dir), "--haystack_dir", str(essays),
                     "--save_dir", str(tmp_path / "out"), *flags])
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess: a fresh interpreter imports torch and transformers
def test_cli_gives_one_line_for_a_model_that_is_nowhere(tmp_path):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, str(REPO / "run_needle_in_haystack.py"), "--s_len", "500", "--e_len",
                               "500", "--model_name", "no-such-org/no-such-model", "--save_dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert finished.returncode != 0
    errors = [line for line in finished.stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in finished.stderr.splitlines() if line.strip()][-1:]  # the last line, alone
    assert "'no-such-org/no-such-model' is not 'smollm2', an existing folder or a .gguf file" in errors[0]
    assert "Traceback" not in finished.stderr


# -- haystack construction -------------------------------------------------------------


def test_insert_needle_moves_back_to_a_period_and_trims():
    period = 0
    context = [5, 5, period, 5, 5, 5, period, 5, 5, 5]
    needle_tokens = [9, 9]
    tokens, point = needle.insert_needle(context, needle_tokens, 50, context_length=100, period_ids={period}, buffer=0)
    assert point == 3
    assert tokens == [5, 5, period, 9, 9, 5, 5, 5, period, 5, 5, 5]
    # context_length 8 leaves room for 6 haystack tokens beside the 2 needle tokens
    tokens, point = needle.insert_needle(context, needle_tokens, 100, context_length=10, period_ids={period}, buffer=2)
    assert (tokens, point) == ([5, 5, period, 5, 5, 5, 9, 9], 6)
    tokens, point = needle.insert_needle(context, needle_tokens, 0, context_length=100, period_ids={period}, buffer=0)
    assert (tokens[:2], point) == ([9, 9], 0)


def test_period_tokens_of_smollm2(tokenizer):
    ids = needle.period_token_ids(tokenizer)
    assert ids and all(tokenizer.decode([i]) == "." for i in ids)


@pytest.mark.parametrize("context_length", [700, 1500])
@pytest.mark.parametrize("depth", [0, 25, 50, 90, 100])
def test_haystack_holds_the_needle_once_at_its_depth_after_a_sentence(tokenizer, essays, context_length, depth):
    haystack = needle.Haystack(tokenizer, essays)
    text, point = haystack.context(context_length, depth)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    target = context_length - needle.FINAL_CONTEXT_LENGTH_BUFFER
    assert abs(len(tokens) - target) <= 2  # decoding then encoding may merge a token at a seam
    assert text.count(NEEDLE_SENTENCE) == 1
    before, after = text.split(NEEDLE_SENTENCE)
    haystack_tokens = target - len(haystack.needle_tokens)
    # the needle starts at most one sentence (~10 tokens) before the requested depth
    assert int(haystack_tokens * depth / 100) - 12 <= point <= int(haystack_tokens * depth / 100)
    if depth == 0:
        assert before.strip() == ""
    elif depth == 100:  # as the seed: appended after the cut, wherever it fell
        assert after.strip() == ""
    else:
        assert before.rstrip().endswith(".")
        assert after.strip().startswith("Essay")


def test_haystack_repeats_the_essays_when_they_are_short(tokenizer, tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "one.txt").write_text("A short essay about boats. It has two sentences.\n")
    text, _ = needle.Haystack(tokenizer, folder).context(400, 50)
    assert text.count("A short essay about boats") > 10
    assert text.count(NEEDLE_SENTENCE) == 1


def test_prompt_puts_the_question_after_the_haystack_in_the_chat_template(tokenizer):
    prompt = needle.build_prompt(tokenizer, "HAYSTACK TEXT", needle.DEFAULT_RETRIEVAL_QUESTION)
    assert prompt.index("HAYSTACK TEXT") < prompt.index(needle.DEFAULT_RETRIEVAL_QUESTION)
    assert prompt.startswith("<|im_start|>")
    assert prompt.rstrip().endswith("<|im_start|>assistant")


# -- scoring ---------------------------------------------------------------------------


def test_rouge_score_is_the_seeds_0_to_10_scale():
    assert needle.rouge_score(NEEDLE_SENTENCE) == pytest.approx(10.0)
    assert needle.rouge_score("") == 0.0
    assert needle.rouge_score("Quantum chromodynamics.") == 0.0
    partial = needle.rouge_score("eat a sandwich")
    wrong = needle.rouge_score("The best thing to do in San Francisco is to start a startup.")
    right = needle.rouge_score("The best thing to do in San Francisco is to eat a sandwich and sit in Dolores Park.")
    assert 0 < partial < right < 10
    assert wrong < right


@pytest.mark.parametrize("response, expected", [
    ("Eat a sandwich and sit in Dolores Park on a sunny day.", 1.0),
    ("eat a SANDWICH in dolores\n  park", 1.0),
    ("I would eat a sandwich.", 0.5),
    ("Go to Dolores Park.", 0.5),
    ("Start a startup.", 0.0),
    ("", 0.0),
])
def test_key_facts_score_half_a_point_each(response, expected):
    assert needle.key_facts_score(response) == expected


def test_a_custom_needle_has_no_key_facts_unless_given():
    assert needle.NeedleTest([1000], [50], needle="The code is 4711.").key_facts == ()
    assert needle.key_facts_score("anything", ()) is None
    assert needle.NeedleTest([1000], [50]).key_facts == needle.DEFAULT_KEY_FACTS


# -- results layout and resume ---------------------------------------------------------


def _sweep(tmp_path, essays, model, tokenizer, **overrides):
    settings = {"context_lengths": [500, 800], "depth_percents": [0, 50, 100], "save_dir": str(tmp_path / "out"),
                "model_name": "tiny", "eval_batch_size": 1}
    settings.update(overrides)
    test = needle.NeedleTest(**settings)
    return test, test.run(model, tokenizer, needle.Haystack(tokenizer, essays))


def test_results_are_one_json_per_cell_with_the_seeds_names(tmp_path, essays, tiny):
    model, tokenizer = tiny
    test, records = _sweep(tmp_path, essays, model, tokenizer)
    assert test.results_dir == tmp_path / "out" / "results" / "tiny_fullkv"
    names = sorted(p.name for p in test.results_dir.iterdir())
    assert names == sorted(f"tiny_fullkv_len_{n}_depth_{d}_results.json" for n in (500, 800) for d in (0, 5000, 10000))
    record = json.loads(test.result_path(800, 50).read_text())
    assert {"model_response", "score", "key_facts_score", "method", "max_capacity_prompt", "prompt_length",
            "kv_kept", "context_length", "depth_percent", "needle"} <= set(record)
    assert (record["method"], record["max_capacity_prompt"]) == ("fullkv", None)
    assert len(record["kv_kept"]) == model.config.num_hidden_layers
    # full KV keeps every prompt token; the prompt is the haystack plus the template and question
    assert record["kv_kept"] == [record["prompt_length"]] * model.config.num_hidden_layers
    assert 600 - 30 <= record["prompt_length"] <= 800
    assert record["score"] == pytest.approx(needle.rouge_score(record["model_response"]))
    assert len(records) == 6


def test_rerun_skips_done_cells_and_runs_missing_ones(tmp_path, essays, tiny):
    model, tokenizer = tiny
    test, _ = _sweep(tmp_path, essays, model, tokenizer)
    before = {p: p.stat().st_mtime_ns for p in test.results_dir.iterdir()}
    _, again = _sweep(tmp_path, essays, model, tokenizer)
    assert again == []
    assert {p: p.stat().st_mtime_ns for p in test.results_dir.iterdir()} == before
    test.result_path(500, 50).unlink()
    _, resumed = _sweep(tmp_path, essays, model, tokenizer)
    assert [(r["context_length"], r["depth_percent"]) for r in resumed] == [(500, 50.0)]


@pytest.mark.parametrize("broken", ["", '{"context_length": 500, "depth', "[1, 2]"])
def test_an_unreadable_cell_is_rewritten_and_left_out_of_plots(tmp_path, essays, tiny, broken, caplog):
    model, tokenizer = tiny
    test, _ = _sweep(tmp_path, essays, model, tokenizer)
    path = test.result_path(500, 50)
    path.write_text(broken)
    assert len(needle.load_results(test.results_dir)) == len(test.cells()) - 1
    assert str(path) in caplog.text
    _, resumed = _sweep(tmp_path, essays, model, tokenizer)
    assert [(r["context_length"], r["depth_percent"]) for r in resumed] == [(500, 50.0)]
    assert json.loads(path.read_text())["context_length"] == 500


def test_cells_written_under_the_old_names_still_count_as_done(tmp_path, essays, tiny):
    model, tokenizer = tiny
    options = {"summary": "merge", "state_budget": 0.5}
    test, _ = _sweep(tmp_path, essays, model, tokenizer, method="snapkv", max_capacity_prompt=64,
                     context_lengths=[500], depth_percents=[50], compress_kwargs=options)
    path = test.result_path(500, 50)
    record = json.loads(path.read_text())
    record["compression"] = {"kernel": "merge", "state_budget": 0.5}  # before the rename
    record["kv_lengths"] = record.pop("kv_kept")
    path.write_text(json.dumps(record))
    _, again = _sweep(tmp_path, essays, model, tokenizer, method="snapkv", max_capacity_prompt=64,
                      context_lengths=[500], depth_percents=[50], compress_kwargs={"kernel": "merge",
                                                                                   "state_budget": 0.5})
    assert again == []
    (loaded,) = needle.load_results(test.results_dir)
    assert loaded["kv_kept"] == record["kv_lengths"]


def test_a_results_folder_of_another_method_is_not_mixed_in(tmp_path, essays, tiny):
    model, tokenizer = tiny
    _sweep(tmp_path, essays, model, tokenizer, context_lengths=[500], depth_percents=[50])
    with pytest.raises(ValueError, match="another run"):
        _sweep(tmp_path, essays, model, tokenizer, context_lengths=[500], depth_percents=[50],
               method="snapkv", model_version="tiny_fullkv")


def test_compressed_cells_record_the_budget_per_layer(tmp_path, essays, tiny):
    model, tokenizer = tiny
    test, records = _sweep(tmp_path, essays, model, tokenizer, method="SnapKV", max_capacity_prompt=64,
                           depth_percents=[50])
    assert test.results_dir.name == "tiny_snapkv_64"
    for record in records:
        assert record["method"] == "snapkv" and record["max_capacity_prompt"] == 64
        assert record["kv_kept"] == [64] * model.config.num_hidden_layers


def test_batched_cells_give_the_unbatched_answers(tmp_path, essays, tiny):
    model, tokenizer = tiny
    _, one_by_one = _sweep(tmp_path / "a", essays, model, tokenizer)
    _, batched = _sweep(tmp_path / "b", essays, model, tokenizer, eval_batch_size=4)
    assert {r["batch_size"] for r in batched} == {4, 2}
    fields = ("context_length", "depth_percent", "prompt_length", "model_response", "kv_kept")
    key = lambda record: (record["context_length"], record["depth_percent"])  # noqa: E731
    assert [[r[f] for f in fields] for r in sorted(batched, key=key)] == \
        [[r[f] for f in fields] for r in sorted(one_by_one, key=key)]


@pytest.mark.parametrize("method", ["fullkv", "snapkv"])
def test_static_decode_and_an_automatic_batch_give_the_same_answers(tmp_path, essays, tiny, method):
    model, tokenizer = tiny
    budget = {"max_capacity_prompt": 64}
    _, dynamic = _sweep(tmp_path / "a", essays, model, tokenizer, method=method, decode="dynamic", **budget)
    _, static = _sweep(tmp_path / "b", essays, model, tokenizer, method=method, decode="static",
                       eval_batch_size="auto", **budget)
    assert {r["decode"] for r in dynamic} == {"dynamic"} and {r["decode"] for r in static} == {"static"}
    assert {r["batch_size"] for r in static} == {4, 2}  # "auto" off the GPU: four at a time
    fields = ("context_length", "depth_percent", "model_response", "kv_kept")
    key = lambda record: (record["context_length"], record["depth_percent"])  # noqa: E731
    assert [[r[f] for f in fields] for r in sorted(static, key=key)] == \
        [[r[f] for f in fields] for r in sorted(dynamic, key=key)]


# -- the question outside the compressed part ------------------------------------------

TINY_CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
                      "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """conftest's small byte-level BPE, with a chat template whose turns are marked by its special tokens."""
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("which", ["tokenizer", "tiny_tokenizer"])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_prompt_split_is_the_one_prompt_cut_after_the_book(request, which, essays, depth):
    tokenizer = request.getfixturevalue(which)
    text, _ = needle.Haystack(tokenizer, essays).context(600, depth)
    context_ids, question_ids = needle.split_prompt_ids(tokenizer, text, needle.DEFAULT_RETRIEVAL_QUESTION)
    prompt = needle.build_prompt(tokenizer, text, needle.DEFAULT_RETRIEVAL_QUESTION)
    assert context_ids + question_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(context_ids).endswith(f"{text} </book>.\n")
    question = tokenizer.decode(question_ids)
    assert question.startswith(" Based on the content of the book, Question: " + needle.DEFAULT_RETRIEVAL_QUESTION)
    assert prompt.endswith(question)


def test_a_cut_inside_a_token_moves_back_to_its_start(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    head, tail = needle.split_token_ids(tiny_tokenizer, text, text.index("quick") + 2)  # "The qu|ick"
    assert head + tail == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(head) == "The"
    assert tiny_tokenizer.decode(tail).startswith(" quick")


def test_question_outside_with_full_kv_gives_the_question_inside_answers(tmp_path, essays, tiny):
    model, tokenizer = tiny
    _, inside = _sweep(tmp_path, essays, model, tokenizer, context_lengths=[500])
    test, outside = _sweep(tmp_path, essays, model, tokenizer, context_lengths=[500], question_outside=True)
    assert test.results_dir == tmp_path / "out" / "results" / "tiny_fullkv_qout"
    fields = ("context_length", "depth_percent", "prompt_length", "model_response", "kv_kept")
    assert [[r[f] for f in fields] for r in outside] == [[r[f] for f in fields] for r in inside]
    question_length = len(needle.split_prompt_ids(tokenizer, "", needle.DEFAULT_RETRIEVAL_QUESTION)[1])
    for record in outside:
        assert json.loads(test.result_path(record["context_length"], record["depth_percent"]).read_text()) == record
        assert (record["question_outside"], record["question_length"]) == (True, question_length)
    assert {(r["question_outside"], r["question_length"]) for r in inside} == {(False, None)}


def test_question_outside_cells_hold_the_budget_plus_the_question_batched_or_not(tmp_path, essays, tiny):
    model, tokenizer = tiny
    settings = {"method": "snapkv", "max_capacity_prompt": 64, "question_outside": True}
    test, one_by_one = _sweep(tmp_path / "a", essays, model, tokenizer, **settings)
    _, batched = _sweep(tmp_path / "b", essays, model, tokenizer, eval_batch_size=4, **settings)
    assert test.results_dir.name == "tiny_snapkv_64_qout"
    assert {r["batch_size"] for r in batched} == {4, 2}
    fields = ("context_length", "depth_percent", "prompt_length", "model_response", "kv_kept")
    assert [[r[f] for f in fields] for r in batched] == [[r[f] for f in fields] for r in one_by_one]
    for record in one_by_one:
        assert record["kv_kept"] == [64 + record["question_length"]] * model.config.num_hidden_layers


def test_question_outside_resumes_and_is_not_mixed_with_question_inside(tmp_path, essays, tiny):
    model, tokenizer = tiny
    settings = {"context_lengths": [500], "depth_percents": [50], "method": "snapkv", "max_capacity_prompt": 64}
    inside_test, _ = _sweep(tmp_path, essays, model, tokenizer, **settings)
    _, outside = _sweep(tmp_path, essays, model, tokenizer, question_outside=True, **settings)
    assert len(outside) == 1
    _, again = _sweep(tmp_path, essays, model, tokenizer, question_outside=True, **settings)
    assert again == []
    with pytest.raises(ValueError, match="another run.*question_outside"):
        _sweep(tmp_path, essays, model, tokenizer, question_outside=True, model_version=inside_test.model_version,
               **settings)
    # a cell written before the mode existed has no question_outside: its question was inside
    path = inside_test.result_path(500, 50)
    record = json.loads(path.read_text())
    del record["question_outside"]
    path.write_text(json.dumps(record))
    assert _sweep(tmp_path, essays, model, tokenizer, **settings)[1] == []


def test_cli_question_outside_reaches_every_test_and_its_results(tiny_dir, essays, tmp_path):
    script = load_script("run_needle_in_haystack.py")
    assert script.parse_args(["--s_len", "500", "--e_len", "500"]).question_outside is False
    script.main(["--s_len", "500", "--e_len", "500", "--depths", "50", "--model_name", str(tiny_dir),
                 "--method", "fullkv", "snapkv", "--max_capacity_prompt", "64", "--question_outside",
                 "--haystack_dir", str(essays), "--save_dir", str(tmp_path / "out")])
    folders = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert folders == [f"{tiny_dir.name}_fullkv_qout", f"{tiny_dir.name}_snapkv_64_qout"]
    records = needle.load_results(tmp_path / "out")
    assert [r["question_outside"] for r in records] == [True, True]


# -- heatmaps --------------------------------------------------------------------------


def _records(method, budget, scores):
    return [{"method": method, "max_capacity_prompt": budget, "context_length": length, "depth_percent": depth,
             "score": score, "key_facts_score": score / 10} for (length, depth), score in scores.items()]


def test_score_grid_puts_depths_on_rows_and_lengths_on_columns():
    records = _records("snapkv", 128, {(1000, 0.0): 10.0, (2000, 0.0): 4.0, (1000, 50.0): 2.0})
    records.append(dict(records[0], score=6.0))  # a repeated cell is averaged
    depths, lengths, grid = viz.score_grid(records)
    assert (depths, lengths) == ([0.0, 50.0], [1000, 2000])
    assert grid[0].tolist() == [8.0, 4.0]
    assert grid[1, 0] == 2.0 and np.isnan(grid[1, 1])


def test_heatmap_png_is_written_with_a_panel_per_run(tmp_path):
    panels = {"fullkv": _records("fullkv", None, {(1000, 0.0): 10.0, (2000, 50.0): 9.0}),
              "snapkv 128": _records("snapkv", 128, {(1000, 0.0): 2.0, (2000, 50.0): 7.0})}
    path = viz.plot_needle_heatmaps(panels, tmp_path / "img" / "needle.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
    with pytest.raises(ValueError, match="empty"):
        viz.plot_needle_heatmaps({"none": []}, tmp_path / "nothing.png")


def test_visualize_script_reads_a_save_dir(tmp_path, essays, tiny):
    model, tokenizer = tiny
    _sweep(tmp_path, essays, model, tokenizer, depth_percents=[50])
    _sweep(tmp_path, essays, model, tokenizer, depth_percents=[50], method="streamingllm", max_capacity_prompt=64)
    runs = needle.load_results_by_run(tmp_path / "out")
    assert list(runs) == ["tiny_fullkv", "tiny_streamingllm_64"]
    visualize = load_script("scripts/scripts_needle/visualize.py")
    visualize.main(["--results_dir", str(tmp_path / "out"), "--metric", "key_facts_score"])
    assert (tmp_path / "out" / "img" / "needle_key_facts_score.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        visualize.main(["--results_dir", str(tmp_path / "out"), "--runs", "tiny_h2o_64"])


# -- attention maps and the notebook ---------------------------------------------------


def test_attention_maps_are_causal_distributions_per_layer(tiny_dir, tokenizer):
    import ntkkv

    model, _ = ntkkv.load_model(str(tiny_dir), attn_implementation="eager")
    input_ids, starts = viz.documents_prompt(tokenizer, ["First doc.", "Second doc here.", "Third."], "Which?")
    maps = viz.layer_attention_maps(model, input_ids)
    n = input_ids.shape[1]
    assert len(maps) == model.config.num_hidden_layers and maps[0].shape == (n, n)
    for attention in maps:
        assert np.allclose(attention.sum(axis=1), 1.0, atol=1e-4)
        assert np.all(np.triu(attention, k=1) == 0)
    assert starts == sorted(starts)
    for index, start in enumerate(starts):
        assert tokenizer.decode(input_ids[0, start:start + 4]).startswith(f"Document {index + 1}")


def test_attention_maps_need_eager_attention(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="eager"):
        viz.layer_attention_maps(model, torch.tensor([[1, 2, 3]]))


@pytest.mark.slow  # the notebook runs in a Jupyter kernel: a fresh interpreter imports torch and transformers
def test_notebook_runs_and_writes_one_png_per_layer(tiny_dir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "visualization.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    out_dir = tmp_path / "attention"
    parameters.source = (f"MODEL = {str(tiny_dir)!r}\nHAYSTACK_DIR = None\nDOC_TOKENS = 40\n"
                         f"QUESTION = 'Which document is about startups?'\nOUT_DIR = {str(out_dir)!r}\n"
                         f"LOG_SCALE = True")
    # the kernel is a child process: it finds ntkkv through PYTHONPATH when it is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert sorted(p.name for p in out_dir.glob("layer_*.png")) == ["layer_00.png", "layer_01.png"]
    assert (out_dir / "all_layers.png").stat().st_size > 1000


# -- the real model --------------------------------------------------------------------


@pytest.mark.slow  # ~40 s to load SmolLM2 (shared with other tests) plus ~10 s for the cell
def test_smollm2_with_full_kv_finds_the_needle(smollm2, tmp_path):
    model, tokenizer = smollm2
    test = needle.NeedleTest([1000], [50], model_name="smollm2", save_dir=str(tmp_path))
    (record,) = test.run(model, tokenizer, needle.Haystack(tokenizer))
    assert record["key_facts_score"] == 1.0, record["model_response"]
    assert record["score"] > 8
    assert record["kv_kept"] == [record["prompt_length"]] * 30



def test_cli_summary_flags_name_the_results_and_are_recorded(tiny_dir, essays, tmp_path):
    script = load_script("run_needle_in_haystack.py")
    out = tmp_path / "out"
    arguments = ["--s_len", "500", "--e_len", "500", "--depths", "50", "--model_name", str(tiny_dir),
                 "--method", "snapkv", "--max_capacity_prompt", "64", "--kernel", "merge", "--state_budget", "0.25",
                 "--haystack_dir", str(essays), "--save_dir", str(out)]
    script.main(arguments)
    (folder,) = (out / "results").iterdir()
    assert folder.name == f"{tiny_dir.name}_snapkv_merge_sb0.25_64"
    (record,) = needle.load_results(out)
    assert record["compression"] == {"summary": "merge", "state_budget": 0.25}
    assert record["kv_kept"] == [48] * 2 and record["kv_state"] == [16.0] * 2
    with pytest.raises(ValueError, match="unknown summary .nope."):
        script.main([*arguments[:-6], "--summary", "nope", "--save_dir", str(out)])
