"""Two-phase generation (`prefill_length`): the context is prefilled and compressed, the rest of
the prompt (the question) is read over the compressed cache, then generation continues."""

import pytest
import torch
from transformers import DynamicCache

import ntkkv
from ntkkv.generation import cache_argument_name
from tiny import random_prompt, tiny_model

STEPS = 6


def left_padded_pair():
    """Prompts of 70 and 45 tokens in one batch, the short one padded on the left."""
    long_prompt, short_prompt = random_prompt(70, seed=3), random_prompt(45, seed=4)
    batch = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    batch[0], mask[0] = long_prompt[0], 1
    batch[1, 25:], mask[1, 25:] = short_prompt[0], 1
    return batch, mask, long_prompt, short_prompt


def greedy(model, input_ids, attention_mask=None, **kwargs):
    return ntkkv.generate(model, input_ids, attention_mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def kept_positions(kept_keys, full_keys):
    """(kv_heads, slots) prompt position of each kept key, read off the unpatched model's keys of sample 0."""
    distance = (kept_keys[0][:, :, None, :] - full_keys[0][:, None, :, :]).abs().amax(-1)
    nearest = distance.min(-1)
    assert (nearest.values < 1e-5).all()
    return nearest.indices


@pytest.mark.parametrize("method, budget", [("fullkv", 128), ("snapkv", 128), ("streamingllm", 128)])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_two_phases_give_the_one_phase_output_when_nothing_is_evicted(method, budget, backend):
    model = tiny_model("llama", backend)
    batch, mask, _, _ = left_padded_pair()
    with ntkkv.compress(model, method, max_capacity_prompt=budget):
        one_phase = greedy(model, batch, mask)
        for prefill_length in (30, 60, 69):
            two_phase = greedy(model, batch, mask, prefill_length=prefill_length)
            assert torch.equal(two_phase.sequences, one_phase.sequences), prefill_length
            assert two_phase.kv_lengths == one_phase.kv_lengths == [[70] * 4, [45] * 4]
            torch.testing.assert_close(torch.stack(two_phase.output.logits), torch.stack(one_phase.output.logits),
                                       rtol=0, atol=1e-5)
            assert two_phase.cache.get_seq_length() == 70 + STEPS - 1


def test_snapkv_holds_its_budget_of_the_context_and_every_question_token():
    model = tiny_model()
    prompt = random_prompt(70)
    context_length, window = 60, 8
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=20, window_size=window):
        inside = greedy(model, prompt)
        outside = greedy(model, prompt, prefill_length=context_length)
    assert inside.kv_lengths == [[20] * 4]
    assert outside.kv_lengths == [[20 + 70 - context_length] * 4]
    assert ntkkv.kv_lengths(outside.cache) == [20 + 10 + STEPS - 1] * 4
    assert outside.cache.get_seq_length() == inside.cache.get_seq_length() == 70 + STEPS - 1
    # which context tokens were kept: SnapKV's observation window is the context's end, not the question
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, **{cache_argument_name(model): full})
    for inside_layer, outside_layer, full_layer in zip(inside.cache.layers, outside.cache.layers, full.layers):
        inside_positions = kept_positions(inside_layer.keys[..., :20, :], full_layer.keys)
        outside_positions = kept_positions(outside_layer.keys[..., :20, :], full_layer.keys[..., :context_length, :])
        assert (inside_positions[:, -window:] == torch.arange(70 - window, 70)).all()
        assert (outside_positions[:, -window:] == torch.arange(context_length - window, context_length)).all()


def test_question_tokens_are_placed_after_the_full_context():
    """StreamingLLM keeps the same tokens in every head, so the unpatched model with the evicted
    context tokens masked out is an independent reference for the question chunk and the decode:
    with positions counted from the kept length instead, the logits would differ."""
    model = tiny_model()
    n, context_length, sinks, window = 60, 48, 4, 12
    prompt = random_prompt(n)
    name = cache_argument_name(model)
    full = DynamicCache(config=model.config)
    reference_logits = []
    with torch.no_grad():
        model(prompt[:, :context_length], **{name: full})
        visible = torch.ones(1, 1, n - context_length, n, dtype=torch.bool).tril(diagonal=context_length)
        visible[..., sinks:context_length - window] = False
        reference_logits.append(model(prompt[:, context_length:], attention_mask=visible, **{name: full}).logits[:, -1])
        for step in range(STEPS - 1):
            token = reference_logits[-1].argmax(-1, keepdim=True)
            visible = torch.ones(1, 1, 1, n + step + 1, dtype=torch.bool)
            visible[..., sinks:context_length - window] = False
            reference_logits.append(model(token, attention_mask=visible, **{name: full}).logits[:, -1])
    with ntkkv.compress(model, "streamingllm", max_capacity_prompt=sinks + window):
        result = greedy(model, prompt, prefill_length=context_length)
    assert result.kv_lengths == [[sinks + window + n - context_length] * 4]
    torch.testing.assert_close(torch.stack(result.output.logits), torch.stack(reference_logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["snapkv", "h2o", "streamingllm"])
def test_left_padded_batch_gives_each_sample_its_alone_output(method):
    model = tiny_model()
    batch, mask, long_prompt, short_prompt = left_padded_pair()
    question = 10  # the last 10 columns of every sample
    with ntkkv.compress(model, method, max_capacity_prompt=20):
        together = greedy(model, batch, mask, prefill_length=70 - question)
        alone = [greedy(model, prompt, prefill_length=prompt.shape[1] - question)
                 for prompt in (long_prompt, short_prompt)]
    assert together.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]
    assert together.kv_lengths == [alone[0].kv_lengths[0], alone[1].kv_lengths[0]] == [[30] * 4, [30] * 4]


@pytest.mark.parametrize("bad", [0, -3, 70, 71, 1.5, True, "5"])
def test_a_prefill_length_outside_the_prompt_is_refused(bad):
    model = tiny_model(layers=1)
    with pytest.raises(ValueError) as error:
        ntkkv.generate(model, random_prompt(70), prefill_length=bad, max_new_tokens=2)
    assert f"got {bad!r}" in str(error.value) and "1 to 69" in str(error.value)


def test_padding_after_the_prefill_is_refused():
    model = tiny_model(layers=1)
    prompt = random_prompt(20)
    mask = torch.ones_like(prompt)
    mask[:, -2:] = 0  # right padding would be read as question tokens
    with pytest.raises(ValueError, match="padding after prefill_length 15"):
        ntkkv.generate(model, prompt, mask, prefill_length=15, max_new_tokens=2)
