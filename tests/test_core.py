"""The core on tiny models: identity at full budget, budgets held, positions, batching,
isolation, restoring the model, and the log-sum-exp merge with an exact kernel."""

import pytest
import torch
from transformers import DynamicCache

import ntkkv
from ntkkv.cache import CompressedCache
from ntkkv.generation import cache_argument_name
from ntkkv.policies import PyramidKV
from ntkkv.summaries import Exact
from tiny import FAMILIES, method_options, random_prompt, tiny_model

COMPRESSING = [m for m in ntkkv.METHODS if m != "fullkv" and "kvzip" not in m]  # kvzip's: test_kvzip.py
# the head-wise methods take no summary that makes slots or a state (test_headwise.py has theirs)
UNIFORM = [m for m in COMPRESSING if m not in ("adakv", "ada_pyramidkv", "headkv")]


def greedy_with_logits(model, input_ids, steps=6, attention_mask=None):
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def prefill(model, input_ids, attention_mask=None):
    cache = CompressedCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, **{cache_argument_name(model): cache}).logits
    return cache, logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_budget_at_least_prompt_gives_the_unpatched_logits_and_tokens(family, backend, tmp_path):
    model = tiny_model(family, backend)
    prompt = random_prompt(40)
    reference_tokens, reference_logits = greedy_with_logits(model, prompt)
    for method in ntkkv.METHODS:
        with ntkkv.compress(model, method, max_capacity_prompt=64, **method_options(method, tmp_path)):
            tokens, logits = greedy_with_logits(model, prompt)
        assert torch.equal(tokens, reference_tokens), method
        torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5, msg=method)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", COMPRESSING)
def test_each_layer_holds_its_budget_after_prefill(family, method, tmp_path):
    model = tiny_model(family)
    with ntkkv.compress(model, method, max_capacity_prompt=64, window_size=8, **method_options(method, tmp_path)):
        cache, _ = prefill(model, random_prompt(300))
    if method == "headkv":  # its budgets are per head over the whole model: the model's total is the budget's
        assert sum(int(layer.ragged.counts.sum()) for layer in cache.layers) == 4 * 2 * 64
        return
    expected = [118, 82, 46, 10] if method in ("pyramidkv", "ada_pyramidkv") else [64] * 4
    assert ntkkv.kv_lengths(cache) == expected
    assert ntkkv.kv_lengths(cache, per_sample=True) == [expected]
    assert cache.get_seq_length() == 300


def test_pyramid_budgets_fall_linearly_and_sum_to_layers_times_budget():
    budgets = PyramidKV(max_capacity_prompt=2048, window_size=8).layer_budgets(32)
    assert sum(budgets) == 32 * 2048
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    # the paper's beta = 20: the top layer's selectable share is 1/20 of the average
    assert budgets[-1] - 8 == pytest.approx((2048 - 8) / 20, abs=1)
    assert budgets[0] - 8 == pytest.approx(2 * (2048 - 8) - (2048 - 8) / 20, abs=2)
    # a prompt shorter than the bottom layer's budget gets the uniform budget, as the original
    assert PyramidKV(max_capacity_prompt=64, window_size=8).layer_budgets(4, prompt_length=100) == [64] * 4


def test_cache_holds_the_chosen_rows_of_the_full_keys_in_order():
    model = tiny_model()
    prompt = random_prompt(120)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, **{cache_argument_name(model): full})
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, window_size=8):
        cache, _ = prefill(model, prompt)
    for full_layer, layer in zip(full.layers, cache.layers):
        for head in range(full_layer.keys.shape[1]):
            full_keys, kept_keys = full_layer.keys[0, head], layer.keys[0, head]
            matches = (kept_keys[:, None, :] == full_keys[None, :, :]).all(-1)
            assert (matches.sum(-1) == 1).all()
            positions = matches.float().argmax(-1)
            assert (positions.diff() > 0).all()
            assert positions[-8:].tolist() == list(range(112, 120))
            torch.testing.assert_close(layer.values[0, head], full_layer.values[0, head, positions], rtol=0, atol=0)


def test_new_tokens_continue_positions_from_the_full_prompt():
    """StreamingLLM keeps the same tokens in every head, so the unpatched model with those tokens
    masked out is an independent reference; with positions counted from the kept length instead
    of the prompt length the logits would differ."""
    model = tiny_model()
    n, sinks, window, steps = 60, 4, 12, 5
    prompt = random_prompt(n)
    full = DynamicCache(config=model.config)
    name = cache_argument_name(model)
    with torch.no_grad():
        reference_logits = [model(prompt, **{name: full}).logits[:, -1]]
        with ntkkv.compress(model, "streamingllm", max_capacity_prompt=sinks + window):
            cache, logits = prefill(model, prompt)
        compressed_logits = [logits[:, -1]]
        for step in range(steps):
            token = reference_logits[-1].argmax(-1, keepdim=True)
            visible = torch.ones(1, 1, 1, n + step + 1, dtype=torch.bool)
            visible[..., sinks : n - window] = False
            reference_logits.append(model(token, attention_mask=visible, **{name: full}).logits[:, -1])
            with ntkkv.compress(model, "streamingllm", max_capacity_prompt=sinks + window):
                compressed_logits.append(model(token, **{name: cache}).logits[:, -1])
    assert cache.get_seq_length() == n + steps
    assert ntkkv.kv_lengths(cache) == [sinks + window + steps] * 4
    torch.testing.assert_close(torch.stack(compressed_logits), torch.stack(reference_logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", COMPRESSING)
def test_plain_generate_matches_ntkkv_generate_and_positions_follow_prompt_length(method, tmp_path):
    model = tiny_model()
    prompt = random_prompt(90)
    with ntkkv.compress(model, method, max_capacity_prompt=24, **method_options(method, tmp_path)):
        plain, _ = greedy_with_logits(model, prompt, steps=8)
        result = ntkkv.generate(model, prompt, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(plain, result.sequences)
    assert result.cache.get_seq_length() == 90 + 7
    assert all(length < 90 for length in result.kv_lengths[0])


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_padded_batch_gives_each_sample_its_alone_output(method, backend, tmp_path):
    model = tiny_model("llama", backend)
    long_prompt, short_prompt = random_prompt(70, seed=3), random_prompt(45, seed=4)
    batch = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    batch[0], mask[0] = long_prompt[0], 1
    batch[1, 25:], mask[1, 25:] = short_prompt[0], 1
    with ntkkv.compress(model, method, max_capacity_prompt=20, **method_options(method, tmp_path)):
        together = ntkkv.generate(model, batch, mask, max_new_tokens=8, min_new_tokens=8)
        alone = [ntkkv.generate(model, p, max_new_tokens=8, min_new_tokens=8) for p in (long_prompt, short_prompt)]
    assert together.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]
    assert together.kv_lengths == [alone[0].kv_lengths[0], alone[1].kv_lengths[0]]


def test_padding_is_never_kept_when_a_sample_is_shorter_than_the_budget():
    model = tiny_model()
    batch = random_prompt(60, batch=2)
    mask = torch.ones_like(batch)
    mask[1, :50] = 0  # sample 1 has 10 real tokens, fewer than the budget
    batch[1, :50] = 0
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=16):
        cache, _ = prefill(model, batch, mask)
    assert ntkkv.kv_lengths(cache) == [16] * 4
    assert ntkkv.kv_lengths(cache, per_sample=True) == [[16] * 4, [10] * 4]


def test_nothing_leaks_between_calls():
    model = tiny_model()
    a, b = random_prompt(80, seed=5), random_prompt(100, seed=6)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=24):
        first = ntkkv.generate(model, a, max_new_tokens=8).new_tokens
        other = ntkkv.generate(model, b, max_new_tokens=8).new_tokens
        again = ntkkv.generate(model, a, max_new_tokens=8).new_tokens
        plain_a1, _ = greedy_with_logits(model, a)
        greedy_with_logits(model, b)
        plain_a2, _ = greedy_with_logits(model, a)
    assert first == again and first != other
    assert torch.equal(plain_a1, plain_a2)


def test_leaving_compress_restores_the_model_exactly():
    model = tiny_model()
    prompt = random_prompt(90)
    before, before_logits = greedy_with_logits(model, prompt)
    forwards = [type(layer.self_attn).forward for layer in model.model.layers]
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=16):
        during, _ = greedy_with_logits(model, prompt)
    after, after_logits = greedy_with_logits(model, prompt)
    assert all("forward" not in vars(layer.self_attn) and not hasattr(layer.self_attn, "ntkkv")
               for layer in model.model.layers)
    assert [type(layer.self_attn).forward for layer in model.model.layers] == forwards
    assert torch.equal(before, after) and torch.equal(before_logits, after_logits)
    assert not torch.equal(before, during)  # the compression did change something while active


def test_replace_llama_patches_globally_and_fullkv_restores():
    model = tiny_model()
    prompt = random_prompt(90)
    reference, _ = greedy_with_logits(model, prompt)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=16):
        scoped, _ = greedy_with_logits(model, prompt)
    try:
        ntkkv.replace_llama("SnapKV", max_capacity_prompt=16)
        patched, _ = greedy_with_logits(model, prompt)
    finally:
        ntkkv.replace_llama("fullkv")
    restored, _ = greedy_with_logits(model, prompt)
    assert torch.equal(patched, scoped) and torch.equal(restored, reference)


@pytest.mark.parametrize("method", UNIFORM)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_exact_kernel_state_merged_through_lse_reproduces_full_attention(method, backend):
    """Kept slots (softmax) + evicted tokens in an exact exp state (log-sum-exp merge) = full attention,
    for every decode step, with padding in the batch."""
    model = tiny_model("qwen2", backend)
    batch = random_prompt(80, batch=2, seed=7)
    mask = torch.ones_like(batch)
    mask[1, :30] = 0
    reference_tokens, reference_logits = greedy_with_logits(model, batch, steps=6, attention_mask=mask)
    with ntkkv.compress(model, method, max_capacity_prompt=16, summary=Exact()):
        tokens, logits = greedy_with_logits(model, batch, steps=6, attention_mask=mask)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, reference_tokens)


def test_per_layer_budget_lists_are_held_layer_by_layer():
    model = tiny_model()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=[40, 30, 20, 16]):
        cache, _ = prefill(model, random_prompt(100))
    assert ntkkv.kv_lengths(cache) == [40, 30, 20, 16]
    with ntkkv.compress(model, "h2o", max_capacity_prompt=[200, 30, 20, 16]):
        cache, _ = prefill(model, random_prompt(100))
    assert ntkkv.kv_lengths(cache) == [100, 30, 20, 16]  # a layer whose budget exceeds the prompt keeps it whole
