"""run_longbench.py and its library on a tiny Llama with a ChatML tokenizer and small LongBench-shaped files."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import ntkkv
from ntkkv.eval import longbench, longbench_run
from ntkkv.eval.jsonl import existing_parts, read_jsonl, read_predictions
from ntkkv.eval.longbench_run import GenerationSettings, Shard
from tiny import load_script, save_chat_llama

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while five boxing wizards jump quickly".split()
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TREC_CLASSES = ["Location", "Human being", "Entity"]


def words(count, seed):
    return " ".join(random.Random(seed).choices(WORDS, k=count))


def chatml_tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator([words(50, seed) for seed in range(50)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"), chatml_tokenizer(), max_positions=1024)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return ntkkv.load_model(str(model_dir))


def longbench_record(dataset, index, context, question="", answers=("the quick brown fox",), all_classes=None):
    return {"input": question, "context": context, "answers": list(answers), "length": len(context.split()),
            "dataset": dataset, "language": "en", "all_classes": all_classes, "_id": f"{dataset}-{index}"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("LongBench")
    write_jsonl(folder / "multi_news.jsonl",
                [longbench_record("multi_news", index, words(30 + 40 * index, index)) for index in range(5)])
    write_jsonl(folder / "multi_news_e.jsonl",
                [{**longbench_record("multi_news", index, words(20, index)), "length": 3000 * index}
                 for index in range(4)])
    shots = "\n".join(f"Question: where is the {word}?\nType: Location" for word in WORDS[:4])
    write_jsonl(folder / "trec.jsonl", [
        longbench_record("trec", index, shots, f"Question: who is the {WORDS[index]}?\nType:", ["Human being"],
                         TREC_CLASSES)
        for index in range(3)
    ])
    return folder


def run_script():
    return load_script("run_longbench.py")


def run_cli(*arguments):
    run_script().main([str(argument) for argument in arguments])


def cli_arguments(model_dir, data_dir, save_dir, *extra, method="SnapKV", budget=16):
    return ["--method", method, "--model_path", model_dir, "--data_dir", data_dir, "--save_dir", save_dir,
            "--max_capacity_prompts", budget, "--max_new_tokens", 4, *extra]


def predictions_by_id(path):
    return {record["_id"]: record for record in read_jsonl(path)}


# --- prompts, truncation, chat template, stop tokens ---------------------------------------------------

def test_every_task_has_a_prompt_and_an_answer_length():
    assert len(longbench.ALL_DATASETS) == 21
    assert set(longbench.DATASET_PROMPT) == set(longbench.ALL_DATASETS) == set(longbench.DATASET_MAX_NEW_TOKENS)
    assert set(longbench.LONGBENCH_E_DATASETS) < set(longbench.ENGLISH_DATASETS)
    example = {"context": "CONTEXT", "input": "QUESTION"}
    for dataset in longbench.ALL_DATASETS:
        prompt = longbench.format_prompt(dataset, example)
        assert "CONTEXT" in prompt and "{" not in prompt, dataset
    assert longbench.format_prompt("repobench-p", example) == (
        "Please complete the code given below. \nCONTEXTQUESTIONNext line of code:\n")
    assert (longbench.DATASET_MAX_NEW_TOKENS["gov_report"], longbench.DATASET_MAX_NEW_TOKENS["hotpotqa"]) == (512, 32)


def test_middle_truncate_keeps_both_ends():
    assert longbench.middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert longbench.middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert longbench.middle_truncate([1, 2, 3], 5) == [1, 2, 3]


def test_long_prompt_is_cut_in_the_middle_inside_the_chat_template(tiny):
    _, tokenizer = tiny
    context = words(1000, 1)
    prompt = longbench.format_prompt("multi_news", {"context": context, "input": ""})
    ids = longbench.build_prompt_ids(tokenizer, prompt, 300, chat=True)
    assert 290 <= len(ids) <= 300 < len(longbench.encode(tokenizer, prompt, chat=True))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nYou are given several news passages. Write a one-page summary of all"
                           " news. \n\nNews:\n" + " ".join(context.split()[:5]))
    assert text.endswith(" ".join(context.split()[-5:]) + "\n\nNow, write a one-page summary of all the news."
                         "\n\nSummary:<|im_end|>\n<|im_start|>assistant\n")


def test_short_prompt_is_left_whole(tiny):
    _, tokenizer = tiny
    prompt = longbench.format_prompt("multi_news", {"context": words(20, 2), "input": ""})
    ids = longbench.build_prompt_ids(tokenizer, prompt, 1000, chat=True)
    assert tokenizer.decode(ids) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    raw = longbench.build_prompt_ids(tokenizer, prompt, 1000, chat=False)
    assert tokenizer.decode(raw) == prompt


def test_chat_template_skips_few_shot_tasks_and_can_be_turned_off(tiny):
    _, tokenizer = tiny
    assert longbench.uses_chat_template("multi_news", tokenizer)
    assert not longbench.uses_chat_template("multi_news", tokenizer, chat_template=False)
    for dataset in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"):
        assert not longbench.uses_chat_template(dataset, tokenizer)


def test_stop_tokens_hold_eos_and_the_end_of_turn(tiny):
    model, tokenizer = tiny
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert longbench.stop_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, end_of_turn})
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    assert newline in longbench_run.stop_ids_for("samsum", tokenizer, model)
    assert newline not in longbench_run.stop_ids_for("multi_news", tokenizer, model)


def test_max_prompt_length_comes_from_the_config_unless_given(tiny):
    model, _ = tiny
    assert longbench.max_prompt_length(model, 512) == 1024 - 512
    assert longbench.max_prompt_length(model, 512, max_length=300) == 300


def test_generation_stops_at_the_end_of_turn_token(model_dir, data_dir, tmp_path):
    model, tokenizer = ntkkv.load_model(str(model_dir))
    fox = tokenizer.convert_tokens_to_ids("fox")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # constant logits: "fox" first (stop tokens are barred from the first step), then <|im_end|>
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[fox], model.lm_head.bias[end_of_turn] = 1.0, 2.0
    examples = read_jsonl(data_dir / "multi_news.jsonl")[:1]
    output = tmp_path / "FullKV.json"
    longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(output),
                              GenerationSettings(method="FullKV", max_new_tokens=6))
    (written,) = read_jsonl(output)
    assert (written["pred"], written["answer_tokens"]) == ("fox", 1)


# --- the command line end to end --------------------------------------------------------------------------

def test_run_writes_original_fields_kept_kv_and_timing(model_dir, data_dir, tmp_path, capsys):
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news,trec", "--max_length", 80,
                           "--model_name", "tiny"))
    news = predictions_by_id(tmp_path / "tiny_16" / "multi_news" / "SnapKV.json")
    trec = predictions_by_id(tmp_path / "tiny_16" / "trec" / "SnapKV.json")
    assert sorted(news) == [f"multi_news-{index}" for index in range(5)] and len(trec) == 3
    source = read_jsonl(data_dir / "multi_news.jsonl")[4]
    written = news["multi_news-4"]
    for key in ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"):
        assert written[key] == source[key]
    assert isinstance(written["pred"], str) and 1 <= written["answer_tokens"] <= 4
    assert written["kv_kept"] == [16, 16] and written["seconds"] >= 0
    assert all(record["prompt_tokens"] <= 80 for record in [*news.values(), *trec.values()])
    assert written["prompt_tokens"] >= 72   # the longest sample was cut to the limit
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "8 new samples over 2 tasks" in summary and "mean kept K/V per layer 16.0" in summary


def test_chat_template_reaches_the_model_input(model_dir, data_dir, tmp_path, tiny):
    _, tokenizer = tiny
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path / "chat", "--datasets", "multi_news,trec"))
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path / "raw", "--datasets", "multi_news,trec",
                           "--no_chat_template"))
    overhead = len(longbench.encode(tokenizer, "x", chat=True)) - len(longbench.encode(tokenizer, "x", chat=False))
    name = model_dir.name.lower()
    for dataset, expected_difference in (("multi_news", overhead), ("trec", 0)):
        chat = predictions_by_id(tmp_path / "chat" / f"{name}_16" / dataset / "SnapKV.json")
        raw = predictions_by_id(tmp_path / "raw" / f"{name}_16" / dataset / "SnapKV.json")
        for sample_id in chat:
            assert chat[sample_id]["prompt_tokens"] - raw[sample_id]["prompt_tokens"] == expected_difference


@pytest.mark.parametrize("method", ["FullKV", "SnapKV"])
def test_batch_of_two_predicts_what_batch_of_one_does(model_dir, data_dir, tmp_path, method):
    for batch_size in (1, 2):
        run_cli(*cli_arguments(model_dir, data_dir, tmp_path / f"b{batch_size}", "--datasets", "multi_news",
                               "--eval_batch_size", batch_size, "--model_name", "tiny", method=method))
    one = predictions_by_id(tmp_path / "b1" / "tiny_16" / "multi_news" / f"{method}.json")
    two = predictions_by_id(tmp_path / "b2" / "tiny_16" / "multi_news" / f"{method}.json")
    assert len(one) == 5
    for sample_id in one:
        for key in ("pred", "answer_tokens", "kv_kept", "prompt_tokens"):
            assert one[sample_id][key] == two[sample_id][key], (sample_id, key)
    if method == "FullKV":
        assert {record["kv_kept"][0] for record in one.values()} == {record["prompt_tokens"] for record in one.values()}


def test_rerun_after_a_kill_keeps_what_was_written_and_finishes(tiny, data_dir, tmp_path, monkeypatch):
    model, tokenizer = tiny
    examples = read_jsonl(data_dir / "multi_news.jsonl")
    settings = GenerationSettings(method="SnapKV", max_capacity_prompts=16, max_new_tokens=3)
    reference = tmp_path / "reference.json"
    longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(reference), settings)

    real_generate_batch, calls = longbench_run.generate_batch, []

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate_batch(*args, **kwargs)

    output = tmp_path / "SnapKV.json"
    monkeypatch.setattr(longbench_run, "generate_batch", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(output), settings)
    monkeypatch.undo()
    written_before = output.read_bytes()
    assert written_before.count(b"\n") == 2
    with open(output, "ab") as handle:
        handle.write(b'{"pred": "half a li')   # a kill in the middle of a write
    assert len(read_predictions(str(output))) == 2

    longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(output), settings)
    assert output.read_bytes().startswith(written_before)
    records = read_jsonl(output)
    assert len(records) == 5 and len({record["_id"] for record in records}) == 5
    expected = predictions_by_id(reference)
    predicted = {record["_id"]: record["pred"] for record in records}
    assert predicted == {key: value["pred"] for key, value in expected.items()}


def test_shards_write_parts_that_merge_into_the_single_process_result(tiny, data_dir, tmp_path):
    model, tokenizer = tiny
    examples = read_jsonl(data_dir / "multi_news.jsonl")
    settings = GenerationSettings(method="PyramidKV", max_capacity_prompts=16, max_new_tokens=3)
    single = tmp_path / "single" / "PyramidKV.json"
    longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(single), settings)
    sharded = tmp_path / "sharded" / "PyramidKV.json"
    for rank in (0, 1):
        longbench_run.run_dataset(model, tokenizer, "multi_news", examples, str(sharded), settings, Shard(rank, 2))
    parts = existing_parts(str(sharded))
    assert [Path(part).name for part in parts] == ["PyramidKV.part0.jsonl", "PyramidKV.part1.jsonl"]
    assert [len(read_jsonl(part)) for part in parts] == [3, 2]
    assert not sharded.exists()
    longbench_run.finish([str(sharded)], Shard())
    assert existing_parts(str(sharded)) == []
    merged = {record["_id"]: record["pred"] for record in read_jsonl(sharded)}
    assert merged == {record["_id"]: record["pred"] for record in read_jsonl(single)}


def test_longbench_e_run_is_scored_by_length(model_dir, data_dir, tmp_path, capsys):
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--longbench_e", "--datasets", "multi_news",
                           "--model_name", "tiny"))
    output = tmp_path / "tiny_16" / "multi_news_e" / "SnapKV.json"
    assert sorted(record["length"] for record in read_jsonl(output)) == [0, 3000, 6000, 9000]
    spec = importlib.util.spec_from_file_location("ntkkv_script_eval", ROOT / "eval.py")
    eval_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_script)
    eval_script.main(["--results_dir", str(tmp_path), "--longbench_e"])
    (scores,) = json.loads((output.parent / "metrics.json").read_text()).values()
    assert scores["samples"] == 4 and set(scores["score"]) == {"0-4k", "4-8k", "8k+"}
    assert "multi_news 8k+" in capsys.readouterr().out


def test_budget_options_and_the_folder_names():
    settings = GenerationSettings(method="SnapKV", max_capacity_prompts=-1, max_capacity_prompts_ratio=0.25)
    assert settings.budget_options() == {"max_capacity_prompt_ratio": 0.25}
    assert GenerationSettings(method="SnapKV", max_capacity_prompts=64).budget_options() == {"max_capacity_prompt": 64}
    assert longbench_run.budget_label(-1, 0.25) == "ratio0.25" and longbench_run.budget_label(128) == "128"
    path = longbench_run.prediction_path("out", "m", "128", "qasper", "H2O", longbench_e=True)
    assert path == "out/m_128/qasper_e/H2O.json"
    script = run_script()
    assert script.default_model_name("/models/Meta-Llama-3-8B-Instruct/") == "meta-llama-3-8b-instruct"
    assert script.default_model_name("weights/SmolLM2-135M.Q4_1.gguf") == "smollm2-135m.q4_1"


def test_examples_are_the_first_n_or_a_seeded_sample():
    examples = [{"_id": index} for index in range(10)]
    assert longbench.select_examples(examples, 3) == examples[:3]
    sampled = longbench.select_examples(examples, 3, "random", seed=7)
    assert sampled == longbench.select_examples(examples, 3, "random", seed=7) != examples[:3]
    assert len({example["_id"] for example in sampled}) == 3
    assert longbench.select_examples(examples, None) == examples


def test_download_unpacks_the_hub_archive(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data/trec.jsonl", '{"_id": "t"}\n')
        bundle.writestr("data/README.md", "not data")
    requested = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *args, **kwargs: requested.append((args, kwargs)) or str(archive))
    longbench.download_longbench(str(tmp_path / "LongBench"))
    assert requested == [(("THUDM/LongBench", "data.zip"), {"repo_type": "dataset"})]
    assert sorted(path.name for path in (tmp_path / "LongBench").iterdir()) == ["trec.jsonl"]


@pytest.mark.slow  # a subprocess: a fresh interpreter imports torch and transformers
def test_launch_under_torchrun_with_two_processes(model_dir, data_dir, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "run_longbench.py"),
               *map(str, cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news", "--model_name", "t"))]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "[rank 0/2]" in finished.stdout and "[rank 1/2]" in finished.stdout
    output = tmp_path / "t_16" / "multi_news" / "SnapKV.json"
    assert len(read_jsonl(output)) == 5 and existing_parts(str(output)) == []


def test_ratio_budgets_are_per_sample_whatever_the_batch(model_dir, data_dir, tmp_path):
    """Each sample keeps round(ratio × its own prompt tokens), batched or alone, with the same predictions."""
    outputs = {}
    for batch in (1, 3):
        save_dir = tmp_path / f"batch{batch}"
        run_cli(*cli_arguments(model_dir, data_dir, save_dir, "--datasets", "multi_news", "--model_name", "tiny",
                               "--max_capacity_prompts_ratio", "0.25", "--eval_batch_size", batch, budget=-1))
        outputs[batch] = predictions_by_id(save_dir / "tiny_ratio0.25" / "multi_news" / "SnapKV.json")
    assert outputs[1].keys() == outputs[3].keys() and len(outputs[1]) == 5
    for sample_id, record in outputs[3].items():
        assert record["kv_kept"] == [max(round(record["prompt_tokens"] * 0.25), 9)] * 2, sample_id
        assert record["kv_kept"] == outputs[1][sample_id]["kv_kept"]
        assert record["pred"] == outputs[1][sample_id]["pred"], sample_id
    assert len({tuple(record["kv_kept"]) for record in outputs[3].values()}) > 1  # the samples differ


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, message", [
    ("4", "max_capacity_prompt must be an integer larger than window_size=8 (or a list of one per layer), got 4"),
    ("-3", "max_capacity_prompt must be an integer larger than window_size=8 (or a list of one per layer), got -3"),
    ("8", "larger than window_size=8"),
])
def test_a_bad_budget_stops_before_the_model_loads_and_writes_nothing(model_dir, data_dir, tmp_path, monkeypatch,
                                                                      budget, message):
    script = run_script()

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script, "load_model", load_model)
    arguments = cli_arguments(model_dir, data_dir, tmp_path / "out", "--datasets", "multi_news", budget=budget)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")) as stopped:
        script.main([str(argument) for argument in arguments])
    assert str(stopped.value).count("\n") == 0  # one line
    assert not (tmp_path / "out").exists()


def test_a_summary_with_ratio_budgets_needs_batches_of_one(model_dir, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--max_capacity_prompts_ratio with a --summary needs --eval_batch_size 1"):
        run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--max_capacity_prompts_ratio", "0.5", "--summary",
                               "merge", "--eval_batch_size", 2, budget=-1))


@pytest.mark.parametrize("change, message", [
    (["--data_dir", "/nonexistent/LongBench"], "data folder '/nonexistent/LongBench' does not exist"),
    (["--datasets", "narrativeqa"],
     r"no narrativeqa.jsonl in .*it holds: multi_news.jsonl, multi_news_e.jsonl, trec.jsonl"),
    (["--datasets", "multi_news,squad"], "unknown LongBench dataset 'squad'; choose from: narrativeqa"),
    (["--method", "snapKV2"], "unknown method 'snapKV2'; choose one of: "),
    (["--model_path", "/nonexistent/model"], "'/nonexistent/model' does not exist"),
    (["--model_path", "no-such-org/no-such-model"], "'no-such-org/no-such-model' is not 'smollm2', an existing folder"),
    (["--max_capacity_prompts", "-1"], "max_capacity_prompts is -1 and max_capacity_prompts_ratio is unset"),
])
def test_bad_input_is_named_and_nothing_written_is_lost(model_dir, data_dir, tmp_path, change, message):
    existing = tmp_path / "tiny_16" / "multi_news" / "SnapKV.json"
    existing.parent.mkdir(parents=True)
    existing.write_text('{"_id": "kept", "pred": "x", "answers": ["x"]}\n')
    arguments = cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news", "--model_name", "tiny")
    arguments = [str(argument) for argument in arguments]
    flag, value = change
    arguments[arguments.index(flag) + 1] = value
    with pytest.raises(SystemExit, match=message):
        run_cli(*arguments)
    assert existing.read_text() == '{"_id": "kept", "pred": "x", "answers": ["x"]}\n'


def test_malformed_data_line_stops_with_file_and_line_or_is_skipped(model_dir, data_dir, tmp_path):
    bad_dir = tmp_path / "data"
    bad_dir.mkdir()
    lines = (data_dir / "multi_news.jsonl").read_text().splitlines()
    (bad_dir / "multi_news.jsonl").write_text("\n".join(lines[:2] + ['{"input": oops'] + lines[2:]) + "\n")
    arguments = cli_arguments(model_dir, bad_dir, tmp_path / "out", "--datasets", "multi_news", "--model_name", "m")
    with pytest.raises(SystemExit, match=r"multi_news.jsonl:3: malformed JSON line"):
        run_cli(*arguments)
    run_cli(*arguments, "--on_bad_line", "skip")
    assert len(read_jsonl(tmp_path / "out" / "m_16" / "multi_news" / "SnapKV.json")) == 5


def test_run_with_a_summary_writes_its_own_file_with_the_state_memory(model_dir, data_dir, tmp_path):
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news", "--max_length", 80,
                           "--model_name", "tiny", "--kernel", "merge", "--state_budget", "4", budget=24))
    records = predictions_by_id(tmp_path / "tiny_24" / "multi_news" / "SnapKV_merge_sb4.json")
    assert {tuple(record["kv_kept"]) for record in records.values()} == {(20, 20)}
    assert {tuple(record["kv_state"]) for record in records.values()} == {(4.0, 4.0)}


# --- automatic batch size ----------------------------------------------------------------------------------

class FakeMemory:
    """A GPU of `capacity` bytes where the weights take `resident` and a batch's peak grows by `per_token`
    for each sample × padded prompt token; more than the capacity is an out-of-memory error."""

    def __init__(self, capacity, resident, per_token):
        self.capacity_bytes, self.resident, self.per_token = capacity, resident, per_token
        self.peak_bytes = resident

    def in_use(self):
        return self.resident

    def capacity(self):
        return self.capacity_bytes

    def reset_peak(self):
        self.peak_bytes = self.resident

    def peak(self):
        return self.peak_bytes

    def release(self):
        pass

    def run(self, batch_size, longest):
        need = self.resident + self.per_token * batch_size * longest
        if need > self.capacity_bytes:
            raise torch.cuda.OutOfMemoryError("simulated")
        self.peak_bytes = need


def test_auto_batch_size_learns_the_memory_a_sample_needs_and_halves_on_out_of_memory():
    from ntkkv.eval.batching import MAX_AUTO_BATCH, MEMORY_SHARE, BatchSizer

    memory = FakeMemory(capacity=10_000_000, resident=1_000_000, per_token=50)
    sizer = BatchSizer("auto", memory=memory)
    lengths = [1000] * 40 + [500] * 100  # longest first
    assert sizer.next_size(lengths) == 1  # nothing measured yet: one sample
    sizer.start()
    memory.run(1, 1000)
    sizer.done(1, 1000)
    # room 0.9 × 9e6 bytes, 50 bytes a token: 162 samples of 1,000 tokens, capped, and no more than are left
    assert sizer.next_size(lengths[1:]) == min(int(MEMORY_SHARE * 9_000_000 // (50 * 1000)), MAX_AUTO_BATCH, 139)
    assert sizer.next_size([500] * 500) == MAX_AUTO_BATCH
    memory.per_token = 200  # the next prompts need more than the first did
    size = sizer.next_size([1000] * 100)
    sizer.start()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        try:
            memory.run(size, 1000)
        except torch.cuda.OutOfMemoryError:
            sizer.out_of_memory(size)  # learns, and re-raises only at one sample
            raise
    assert sizer.next_size([1000] * 100) == size // 2
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one sample that does not fit is an error
        try:
            raise torch.cuda.OutOfMemoryError("simulated")
        except torch.cuda.OutOfMemoryError:
            sizer.out_of_memory(1)


def test_auto_batch_size_off_the_gpu_and_bad_values():
    from ntkkv.eval.batching import CPU_AUTO_BATCH, BatchSizer, batch_size_setting

    assert BatchSizer("auto", device="cpu").next_size([10] * 20) == CPU_AUTO_BATCH
    assert BatchSizer(3, device="cpu").next_size([10] * 2) == 2
    assert batch_size_setting("AUTO") == "auto" and batch_size_setting("8") == 8
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match=f"--eval_batch_size must be a positive integer or 'auto', got '{bad}'"):
            batch_size_setting(bad)


def test_runner_with_an_automatic_batch_size(model_dir, data_dir, tmp_path):
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news", "--model_name", "tiny",
                           "--eval_batch_size", "auto"))
    records = read_jsonl(tmp_path / "tiny_16" / "multi_news" / "SnapKV.json")
    assert len(records) == 5 and {record["batch_size"] for record in records} == {4, 1}  # CPU: 4 at a time
    assert {record["decode"] for record in records} == {"dynamic"}  # the CPU's default path
    with pytest.raises(SystemExit):
        run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--eval_batch_size", "0"))
