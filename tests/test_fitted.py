"""Fitted compaction (`--summary fitted`): exact where the kept slots can represent the prompt, never
worse than eviction on its reference queries (against a slow reference of both errors), zero extra
memory, a sample in a batch fitted as alone, and the runners' flags."""

import argparse
import math

import pytest
import torch

import ntkkv
from ntkkv.cache import state_sizes
from ntkkv.eval.options import add_compression_arguments, check_run, compression_options
from ntkkv.summaries import Fitted, LayerPlan, build_summary
from tiny import long_and_short, random_prompt, tiny_model

SCALING = 0.35


def gather(tensor, indices):
    return tensor.gather(2, indices[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def random_case(seed, queries=24, batch=2, kv_heads=2, n=40, d=8, kept=12, padding=9, short=3, spread=2.0):
    """Keys, values, kept indices and bias, evicted mask and reference queries as the compressor passes
    them: sample 1 is left-padded by `padding` tokens and keeps `short` fewer slots, which repeat its first
    pick in front with bias -inf."""
    generator = torch.Generator().manual_seed(seed)
    keys = spread * torch.randn(batch, kv_heads, n, d, generator=generator)
    values = torch.randn(batch, kv_heads, n, d, generator=generator)
    reference = spread * torch.randn(batch, kv_heads, queries, d, generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :padding] = False
    rows, bias = [], torch.zeros(batch, kv_heads, kept)
    for sample in range(batch):
        heads = []
        for _ in range(kv_heads):
            real = valid[sample].nonzero().flatten()
            count = kept - (short if sample == 1 else 0)
            picks = real[torch.randperm(len(real), generator=generator)[:count]].sort().values
            heads.append(torch.cat([picks[:1].expand(kept - count), picks]))
        rows.append(torch.stack(heads))
    bias[1, :, :short] = -math.inf
    kept_indices = torch.stack(rows)
    evicted = valid[:, None, :].expand(batch, kv_heads, n).clone().scatter_(2, kept_indices, False)
    return keys, values, kept_indices, bias, evicted, reference


def slow_errors(keys, values, kept, bias, evicted, queries, kept_values, kept_bias):
    """Per (sample, KV head): Σ over the reference queries of ‖o − o_full‖², o_full full attention over
    the real tokens (kept or evicted), o attention over the kept slots with `kept_bias` and `kept_values`;
    one head and query at a time."""
    batch, kv_heads = kept.shape[:2]
    errors = torch.zeros(batch, kv_heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            slots = [j for j in range(kept.shape[-1]) if bias[b, h, j] > -math.inf]
            real = sorted(set(evicted[b, h].nonzero().flatten().tolist()) | {int(kept[b, h, j]) for j in slots})
            for q in queries[b, h].double():
                full_weights = torch.softmax(torch.stack([SCALING * q @ keys[b, h, t].double() for t in real]), 0)
                full = sum(w * values[b, h, t].double() for w, t in zip(full_weights, real))
                logits = [SCALING * q @ keys[b, h, kept[b, h, j]].double() + float(kept_bias[b, h, j]) for j in slots]
                weights = torch.softmax(torch.stack(logits), 0)
                output = sum(w * kept_values[b, h, j].double() for w, j in zip(weights, slots))
                errors[b, h] += (output - full).square().sum()
    return errors


# -- the fit ------------------------------------------------------------------------------------

def test_copies_of_kept_tokens_are_fitted_exactly_for_every_query():
    """Evicted tokens that repeat kept keys: weight 1 + copies and the mean value make the kept slots
    full attention for any query, not only the reference ones."""
    generator = torch.Generator().manual_seed(0)
    kept_keys = torch.randn(1, 2, 4, 6, generator=generator)
    copies = torch.tensor([0, 0, 2, 3, 3, 3])  # slot 1 has none
    keys = torch.cat([kept_keys, kept_keys[:, :, copies]], dim=2)
    values = torch.randn(1, 2, 10, 6, generator=generator)
    kept = torch.arange(4).expand(1, 2, 4)
    evicted = torch.arange(10).expand(1, 2, 10) >= 4
    reference = torch.randn(1, 2, 8, 6, generator=generator)
    fitted_values, fitted_bias = Fitted(ridge=1e-7).refit(keys, values, kept, torch.zeros(1, 2, 4), evicted,
                                                          reference, SCALING, 0)
    torch.testing.assert_close(fitted_bias.exp(), torch.tensor([3.0, 1.0, 2.0, 4.0]).expand(1, 2, 4), atol=1e-4,
                               rtol=0)
    group = torch.tensor([0, 1, 2, 3, 0, 0, 2, 3, 3, 3])
    means = torch.stack([values[:, :, group == slot].mean(dim=2) for slot in range(4)], dim=2)
    torch.testing.assert_close(fitted_values, means, atol=1e-4, rtol=0)
    held_out = 3 * torch.randn(1, 2, 5, 6, generator=generator)
    full = torch.softmax(SCALING * held_out @ keys.transpose(-1, -2), -1) @ values
    compact = torch.softmax(SCALING * held_out @ kept_keys.transpose(-1, -2) + fitted_bias[:, :, None], -1)
    torch.testing.assert_close(compact @ fitted_values, full, atol=1e-4, rtol=0)


def test_with_more_kept_slots_than_queries_the_reference_queries_are_matched_exactly():
    """Fewer queries than kept slots, none of them peaked on a single slot: their outputs can be hit."""
    keys, values, kept, bias, evicted, reference = random_case(1, queries=5, spread=1.0)
    fitted_values, fitted_bias = Fitted(ridge=1e-7).refit(keys, values, kept, bias, evicted, reference, SCALING, 0)
    fitted = slow_errors(keys, values, kept, bias, evicted, reference, fitted_values, fitted_bias)
    evicting = slow_errors(keys, values, kept, bias, evicted, reference, gather(values, kept), bias)
    assert (fitted < 1e-6 * evicting).all()  # exact up to float32


@pytest.mark.parametrize("queries", [4, 12, 40])
@pytest.mark.parametrize("ridge, improvement", [(1e-3, 0.6), (0.1, 0.6), (10.0, 0.95)])
def test_never_worse_than_eviction_on_the_reference_queries(queries, ridge, improvement):
    """Random cases with left padding and padding slots, fewer, as many and more queries than kept
    slots: per sample and KV head the fitted slots' error is at most eviction's, and much lower overall."""
    ratios = []
    for seed in range(4):
        keys, values, kept, bias, evicted, reference = random_case(seed, queries=queries)
        fitted_values, fitted_bias = Fitted(ridge=ridge).refit(keys, values, kept, bias, evicted, reference,
                                                               SCALING, 0)
        assert fitted_values.dtype == values.dtype and fitted_bias.dtype == torch.float32
        assert torch.equal(fitted_bias[1, :, :3], bias[1, :, :3])  # padding slots stay -inf
        fitted = slow_errors(keys, values, kept, bias, evicted, reference, fitted_values, fitted_bias)
        evicting = slow_errors(keys, values, kept, bias, evicted, reference, gather(values, kept), bias)
        assert (fitted <= evicting * (1 + 1e-5) + 1e-9).all()
        ratios.append(fitted / evicting)
    assert torch.cat(ratios).mean() < improvement


def test_nothing_evicted_leaves_the_kept_slots_as_they_are():
    keys, values, kept, bias, _, reference = random_case(2)
    evicted = torch.zeros(keys.shape[:3], dtype=torch.bool)
    fitted_values, fitted_bias = Fitted().refit(keys, values, kept, bias, evicted, reference, SCALING, 0)
    assert torch.equal(fitted_values, gather(values, kept)) and torch.equal(fitted_bias, bias)


def test_a_sample_is_fitted_in_a_batch_as_alone():
    """Sample 1 of the batch, without its left padding and its padding slots, alone."""
    keys, values, kept, bias, evicted, reference = random_case(3)
    together = Fitted().refit(keys, values, kept, bias, evicted, reference, SCALING, 0)
    pad, short = 9, 3
    alone = Fitted().refit(keys[1:, :, pad:], values[1:, :, pad:], kept[1:, :, short:] - pad, bias[1:, :, short:],
                           evicted[1:, :, pad:], reference[1:], SCALING, 0)
    torch.testing.assert_close(together[0][1:, :, short:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1][1:, :, short:], alone[1], atol=1e-5, rtol=1e-5)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="ridge must be a positive number, got 0"):
        Fitted(ridge=0)
    with pytest.raises(ValueError, match="min_weight must be a positive number, got -1"):
        Fitted(min_weight=-1)
    with pytest.raises(ValueError, match="state_budget applies to the cluster summaries, not 'fitted'"):
        build_summary("fitted", state_budget=0.25)


# -- in the model ------------------------------------------------------------------------------

def test_zero_extra_memory():
    assert Fitted().plan(128, 64) == LayerPlan(128, 128)
    model = tiny_model()
    held = {}
    for method in ("snapkv", "pyramidkv"):
        for summary in ("none", "fitted"):
            with ntkkv.compress(model, method, max_capacity_prompt=40, summary=summary):
                result = ntkkv.generate(model, random_prompt(150), max_new_tokens=2)
            held[method, summary] = (result.kv_kept, state_sizes(result.cache))
        assert held[method, "fitted"] == held[method, "none"]
        assert all(size == 0 for size in held[method, "fitted"][1])


def test_fitted_slots_bring_decode_closer_to_full_attention():
    model = tiny_model()
    prompt = random_prompt(200, seed=4)
    options = dict(max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    full = ntkkv.generate(model, prompt, **options).output.logits[1]
    errors = {}
    for name in ("none", "fitted"):
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=80, summary=name):
            logits = ntkkv.generate(model, prompt, **options).output.logits[1]
        errors[name] = (logits - full).norm() / full.norm()
    assert errors["fitted"] < 0.5 * errors["none"]


def test_left_padded_batch_gives_each_sample_its_alone_output():
    model = tiny_model()
    batch, mask, long_prompt, short_prompt = long_and_short()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=20, summary="fitted"):
        together = ntkkv.generate(model, batch, mask, max_new_tokens=8, min_new_tokens=8)
        alone = [ntkkv.generate(model, p, max_new_tokens=8, min_new_tokens=8) for p in (long_prompt, short_prompt)]
    assert together.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]
    assert together.kv_lengths == [alone[0].kv_lengths[0], alone[1].kv_lengths[0]]


def test_runner_flags_take_summary_fitted():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    config = tiny_model().config
    options = compression_options(parser.parse_args(["--summary", "fitted"]))
    assert options == {"summary": "fitted"}
    check_run(["snapkv", "pyramidkv"], [64], options, config)
    with pytest.raises(ValueError, match="state_budget applies to the cluster summaries"):
        check_run(["snapkv"], [64], compression_options(parser.parse_args(["--summary", "fitted",
                                                                            "--state_budget", "0.25"])), config)
