"""CaM (`ntkkv.summaries.cam`): the merge rule by hand and against a per-token loop, the seeded Bernoulli
draws, zero extra memory, a sample in a padded batch as alone, nothing evicted as eviction, and the CLIs."""

import math

import pytest
import torch
from test_longbench_run import cli_arguments, data_dir, model_dir, predictions_by_id, run_cli  # noqa: F401

import ntkkv
from ntkkv.cache import CompressedCache, kv_lengths, state_sizes
from ntkkv.compressor import Compressor
from ntkkv.generation import cache_argument_name
from ntkkv.policies import SnapKV
from ntkkv.summaries import CAM, LayerPlan, build_summary, cam
from tiny import long_and_short, random_prompt, tiny_model

COMPRESSING = ["snapkv", "pyramidkv", "h2o", "streamingllm"]


def slow_cam(keys, values, kept, kept_bias, evicted, queries, scaling, merge_budget):
    """The definition, one token at a time: Ā_j the mean over queries of the softmax over the real tokens
    (evicted or kept by a slot of finite bias); each evicted i gives p_i·v_i/|W_i| to each of the first
    `merge_budget` real kept tokens after it, p_i = min(1, Ā_i / mean of Ā over them)."""
    batch, heads, n, d = values.shape
    out = values.gather(2, kept[..., None].expand(-1, -1, -1, d)).double()
    for b in range(batch):
        for h in range(heads):
            slots = {int(kept[b, h, s]): s for s in range(kept.shape[-1]) if math.isfinite(kept_bias[b, h, s])}
            real = sorted(set(slots) | {i for i in range(n) if evicted[b, h, i]})
            shares = dict.fromkeys(real, 0.0)
            for q in range(queries.shape[2]):
                weights = {j: math.exp(scaling * float(queries[b, h, q].double() @ keys[b, h, j].double()))
                           for j in real}
                total = sum(weights.values())
                for j in real:
                    shares[j] += weights[j] / total / queries.shape[2]
            for i in range(n):
                if not evicted[b, h, i]:
                    continue
                targets = [j for j in sorted(slots) if j > i][:merge_budget]
                if not targets:
                    continue
                mean = sum(shares[j] for j in targets) / len(targets)
                probability = min(1.0, shares[i] / mean)
                for j in targets:
                    out[b, h, slots[j]] += probability * values[b, h, i].double() / len(targets)
    return out.to(values.dtype)


def hand_case():
    """Six tokens, one query: token j's weight is a_j (key (log a_j, 0), query (1, 0), scaling 1), so
    Ā_j = a_j / Σa. Kept: 0, 3, 5; evicted: 1, 2, 4; merge_budget 2.
    Token 1 (a = 1) -> {3, 5}, mean a 2: p = 1/2, so 1/4 of v1 to each. Token 2 (a = 2) -> {3, 5}: p = 1,
    1/2 of v2 to each. Token 4 (a = 6) -> {5} alone (the last kept token), mean a 2: p = min(1, 3) = 1, all of v4."""
    a = torch.tensor([4.0, 1.0, 2.0, 2.0, 6.0, 2.0])
    keys = torch.stack([a.log(), torch.zeros(6)], dim=-1)[None, None]
    values = torch.stack([torch.arange(6.0), torch.ones(6)], dim=-1)[None, None]  # v_j = (j, 1)
    queries = torch.tensor([[[[1.0, 0.0]]]])
    kept = torch.tensor([[[0, 3, 5]]])
    evicted = torch.tensor([[[False, True, True, False, True, False]]])
    return keys, values, queries, kept, torch.zeros(1, 1, 3), evicted


def test_cam_by_hand():
    keys, values, queries, kept, kept_bias, evicted = hand_case()
    merged, bias = CAM(merge_budget=2).refit(keys, values, kept, kept_bias, evicted, queries, 1.0, 0)
    v = values[0, 0]
    expected = torch.stack([v[0], v[3] + v[1] / 4 + v[2] / 2, v[5] + v[1] / 4 + v[2] / 2 + v[4]])
    torch.testing.assert_close(merged[0, 0], expected)
    assert torch.equal(bias, kept_bias)
    torch.testing.assert_close(merged, slow_cam(keys, values, kept, kept_bias, evicted, queries, 1.0, 2))


def random_layer(seed=0, batch=2, heads=2, n=30, d=8, k=10, m=6, pad=5):
    """Random keys, values and queries; sample 1 has `pad` tokens of left padding; head (0, 1) keeps two
    fewer tokens (padding slots in front repeating its first pick, bias -inf), as head-wise policies do."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(batch, heads, n, d, generator=generator) for _ in range(2))
    queries = torch.randn(batch, heads, m, d, generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :pad] = False
    kept = torch.empty(batch, heads, k, dtype=torch.long)
    kept_bias = torch.zeros(batch, heads, k)
    for b in range(batch):
        for h in range(heads):
            first = int((~valid[b]).sum())
            picks = first + torch.randperm(n - first - 4, generator=generator)[: k - 4] if (b, h) != (0, 1) else \
                torch.randperm(n - 4, generator=generator)[: k - 6]
            row = torch.cat([picks.sort().values, torch.arange(n - 4, n)])
            kept[b, h] = torch.cat([row[:1].expand(k - len(row)), row])
            kept_bias[b, h, : k - len(row)] = -math.inf
    evicted = valid[:, None, :].expand(batch, heads, n).clone()
    for b in range(batch):
        for h in range(heads):
            evicted[b, h, kept[b, h]] = False
    return keys, values, queries, kept, kept_bias, evicted


@pytest.mark.parametrize("merge_budget", [1, 3, 32])
def test_cam_matches_a_per_token_loop_with_padding_slots_and_left_padding(merge_budget):
    keys, values, queries, kept, kept_bias, evicted = random_layer()
    merged, bias = CAM(merge_budget=merge_budget).refit(keys, values, kept, kept_bias, evicted, queries, 0.4, 3)
    expected = slow_cam(keys, values, kept, kept_bias, evicted, queries, 0.4, merge_budget)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bias, kept_bias)
    padding = torch.isinf(kept_bias)
    gathered = values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1]))
    assert padding.any() and torch.equal(merged[padding], gathered[padding])  # padding slots receive nothing
    assert not torch.allclose(merged[~padding], gathered[~padding])


def test_shares_from_many_queries_in_chunks_equal_one_pass(monkeypatch):
    keys, values, queries, kept, kept_bias, evicted = random_layer(m=40)
    whole, _ = CAM(merge_budget=3).refit(keys, values, kept, kept_bias, evicted, queries, 0.4, 0)
    monkeypatch.setattr(cam, "CHUNK_ELEMENTS", 2 * 2 * 30 * 7)  # 7 queries a chunk: 6 chunks, the last short
    chunked, _ = CAM(merge_budget=3).refit(keys, values, kept, kept_bias, evicted, queries, 0.4, 0)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, slow_cam(keys, values, kept, kept_bias, evicted, queries, 0.4, 3),
                               rtol=1e-5, atol=1e-5)


def test_sampled_cam_draws_each_merge_whole_with_its_probability():
    keys, values, queries, kept, kept_bias, evicted = hand_case()
    v = values[0, 0]
    drawn = []
    for seed in range(200):
        cam = CAM(merge_budget=2, sample=True, seed=seed)
        merged = cam.refit(keys, values, kept, kept_bias, evicted, queries, 1.0, 0)[0][0, 0]
        assert torch.equal(merged, cam.refit(keys, values, kept, kept_bias, evicted, queries, 1.0, 0)[0][0, 0])
        # tokens 2 and 4 merge surely (p = 1), token 1 with p = 1/2: half of v1 to tokens 3 and 5, or nothing
        share = merged[1] - v[3] - v[2] / 2
        assert torch.equal(merged[2] - v[5] - v[2] / 2 - v[4], share) and torch.equal(merged[0], v[0])
        assert torch.equal(share, v[1] / 2) or torch.equal(share, torch.zeros(2))
        drawn.append(bool(share.any()))
    assert 0.35 < sum(drawn) / len(drawn) < 0.65


def test_nothing_evicted_leaves_the_kept_values_exactly():
    keys, values, queries, kept, kept_bias, _ = random_layer()
    values = values.to(torch.bfloat16)
    nothing = torch.zeros(keys.shape[:3], dtype=torch.bool)
    merged, _ = CAM().refit(keys, values, kept, kept_bias, nothing, queries, 0.4, 0)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1])))


def test_plan_is_all_exact_and_errors_name_the_bad_value():
    assert CAM().plan(128, 64, 9) == LayerPlan(128, 128)
    assert isinstance(build_summary("cam"), CAM) and build_summary("CAM").refits_kept
    for kwargs, message in [({"merge_budget": 0}, "merge_budget must be a positive integer, got 0"),
                            ({"sample": "yes"}, "sample must be True or False"), ({"seed": 1.5}, "seed must be")]:
        with pytest.raises(ValueError, match=message):
            CAM(**kwargs)


# -- in the model --------------------------------------------------------------------------------


def prefill(model, input_ids, attention_mask=None):
    cache = CompressedCache(config=model.config)
    # positions count real tokens only, as generate gives them: a left-padded sample's keys rotate as alone
    positions = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, position_ids=positions, **{cache_argument_name(model): cache})
    return cache


@pytest.mark.parametrize("method", COMPRESSING)
def test_cam_holds_exactly_what_plain_eviction_holds(method):
    """Zero extra memory: the same slots (same keys), no merged slots or state; only values differ."""
    model = tiny_model()
    prompt = random_prompt(200)
    caches = {}
    for summary in ("none", "cam"):
        with ntkkv.compress(model, method, max_capacity_prompt=48, summary=summary):
            caches[summary] = prefill(model, prompt)
            result = ntkkv.generate(model, prompt, max_new_tokens=2)
        assert result.state_tokens == [[0.0] * 4]
    evicting, merging = caches["none"], caches["cam"]
    assert kv_lengths(merging) == kv_lengths(evicting) and kv_lengths(merging, True) == kv_lengths(evicting, True)
    assert state_sizes(merging) == state_sizes(evicting) == [0.0] * 4
    for plain, merged in zip(evicting.layers, merging.layers):
        assert torch.equal(merged.keys, plain.keys) and torch.equal(merged.bias, plain.bias)
        assert merged.merged_slots == 0 and merged.state is None
        assert not torch.allclose(merged.values, plain.values)


def test_a_sample_in_a_left_padded_batch_keeps_the_values_it_keeps_alone():
    model = tiny_model()
    batch, mask, long_prompt, short_prompt = long_and_short(90, 60)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=24, summary="cam"):
        together = prefill(model, batch, mask)
        alone = [prefill(model, prompt) for prompt in (long_prompt, short_prompt)]
        generated = ntkkv.generate(model, batch, mask, max_new_tokens=6, min_new_tokens=6).new_tokens
        expected = [ntkkv.generate(model, p, max_new_tokens=6, min_new_tokens=6).new_tokens[0]
                    for p in (long_prompt, short_prompt)]
    for layer, layers_alone in zip(together.layers, zip(*(cache.layers for cache in alone))):
        for sample, single in enumerate(layers_alone):
            torch.testing.assert_close(layer.keys[sample], single.keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[sample], single.values[0], rtol=1e-5, atol=1e-5)
    assert generated == expected


def test_compressor_sample_in_a_padded_batch_equals_alone():
    """The layer itself, on random tensors: a shorter sample left-padded into a batch gives its alone values."""
    generator = torch.Generator().manual_seed(2)
    n, pad, heads, kv_heads, d = 40, 12, 4, 2, 8
    queries = torch.randn(2, heads, n, d, generator=generator)
    keys, values = (torch.randn(2, kv_heads, n, d, generator=generator) for _ in range(2))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :pad] = False
    compressor = Compressor(SnapKV(max_capacity_prompt=12, window_size=4), CAM(merge_budget=4))
    together = compressor.compress_layer(queries, keys, values, valid, 0, 1, 0.35)
    alone = compressor.compress_layer(queries[1:, :, pad:], keys[1:, :, pad:], values[1:, :, pad:],
                                      valid[1:, pad:], 0, 1, 0.35)
    evicting = Compressor(SnapKV(max_capacity_prompt=12, window_size=4)).compress_layer(
        queries[1:, :, pad:], keys[1:, :, pad:], values[1:, :, pad:], valid[1:, pad:], 0, 1, 0.35)
    torch.testing.assert_close(together.values[1:], alone.values, rtol=1e-6, atol=1e-6)
    assert torch.equal(together.keys[1:], alone.keys) and torch.equal(alone.keys, evicting.keys)
    assert not torch.allclose(alone.values, evicting.values)


def test_a_prompt_within_the_budget_is_plain_eviction():
    model = tiny_model()
    prompt = random_prompt(40)
    options = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64):
        evicting = ntkkv.generate(model, prompt, **options)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, summary="cam"):
        merging = ntkkv.generate(model, prompt, **options)
    assert merging.new_tokens == evicting.new_tokens and merging.kv_kept == [[40] * 4]
    assert all(torch.equal(a, b) for a, b in zip(merging.output.logits, evicting.output.logits))


def test_longbench_cli_runs_cam_at_the_memory_of_eviction(model_dir, data_dir, tmp_path):  # noqa: F811
    run_cli(*cli_arguments(model_dir, data_dir, tmp_path, "--datasets", "multi_news", "--max_length", 80,
                           "--model_name", "tiny", "--summary", "cam", budget=24))
    records = predictions_by_id(tmp_path / "tiny_24" / "multi_news" / "SnapKV_cam.json")
    assert {tuple(record["kv_kept"]) for record in records.values()} == {(24, 24)}
    assert {tuple(record["kv_state"]) for record in records.values()} == {(0.0, 0.0)}
