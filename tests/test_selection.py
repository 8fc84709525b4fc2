"""Each method's choice against a slow reference written from the method's definition."""

import math

import pytest
import torch

from ntkkv.methods import H2O, PyramidKV, SelectionInputs, SnapKV, StreamingLLM, build_method


def random_inputs(n=50, batch=2, kv_heads=2, group=2, d=8, padding=(0, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, kv_heads, group, n, d, generator=generator) * 2
    keys = torch.randn(batch, kv_heads, n, d, generator=generator) * 2
    values = torch.randn(batch, kv_heads, n, d, generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    for sample, pad in enumerate(padding):
        valid[sample, :pad] = False
    return SelectionInputs(queries, keys, values, valid, scaling=d**-0.5)


def attention_row(inputs, b, h, g, i):
    """Softmax of query i over the real keys j <= i, one element at a time."""
    n = inputs.keys.shape[2]
    logits = [float(inputs.queries[b, h, g, i] @ inputs.keys[b, h, j]) * inputs.scaling
              if j <= i and inputs.valid[b, j] else -math.inf for j in range(n)]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def slow_choice(inputs, scores_of, budget, window, kernel_size, pooling, reduce="mean"):
    """scores_of(b, h, g) -> list of n scores; returns the kept indices per (b, h)."""
    batch, kv_heads, group, n, _ = inputs.queries.shape
    kept = []
    for b in range(batch):
        for h in range(kv_heads):
            per_head = [scores_of(b, h, g) for g in range(group)]
            combine = (lambda xs: sum(xs) / len(xs)) if reduce == "mean" else max
            scores = [combine([per_head[g][j] for g in range(group)]) for j in range(n - window)]
            scores = [s if inputs.valid[b, j] else 0.0 for j, s in enumerate(scores)]
            if kernel_size:
                half = kernel_size // 2
                pooled = []
                for j in range(len(scores)):
                    neighbours = [scores[k] for k in range(j - half, j + half + 1) if 0 <= k < len(scores)]
                    pooled.append(max(neighbours) if pooling == "maxpool" else sum(neighbours) / kernel_size)
                scores = pooled
            scores = [s if inputs.valid[b, j] else -math.inf for j, s in enumerate(scores)]
            order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
            kept.append(sorted(order[: budget - window]) + list(range(n - window, n)))
    return torch.tensor(kept).view(batch, kv_heads, budget)


def snap_scores(inputs, window):
    n = inputs.keys.shape[2]
    def scores_of(b, h, g):
        rows = [attention_row(inputs, b, h, g, i) for i in range(n - window, n)]
        return [sum(row[j] for row in rows) for j in range(n)]
    return scores_of


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_snapkv_matches_its_definition(pooling, reduce):
    inputs = random_inputs()
    method = SnapKV(max_capacity_prompt=20, window_size=6, kernel_size=5, pooling=pooling, gqa_reduce=reduce)
    expected = slow_choice(inputs, snap_scores(inputs, 6), 20, 6, 5, pooling, reduce)
    assert torch.equal(method.select(inputs, 0, 20), expected)


def test_h2o_matches_its_definition_with_blocks_smaller_than_the_prompt():
    inputs = random_inputs(n=40)
    n = 40
    def scores_of(b, h, g):
        rows = [attention_row(inputs, b, h, g, i) for i in range(n) if inputs.valid[b, i]]
        return [sum(row[j] for row in rows) for j in range(n)]
    expected = slow_choice(inputs, scores_of, 16, 4, 7, "maxpool")
    for block in (3, 16, None):
        method = H2O(max_capacity_prompt=16, window_size=4, query_block=block)
        assert torch.equal(method.select(inputs, 0, 16), expected), block


def test_streamingllm_keeps_the_first_real_tokens_and_the_last_window():
    inputs = random_inputs(n=30, padding=(0, 5))
    kept = StreamingLLM(max_capacity_prompt=10, window_size=6).select(inputs, 0, 10)
    assert kept[0, 0].tolist() == [0, 1, 2, 3] + list(range(24, 30))
    assert kept[1, 1].tolist() == [5, 6, 7, 8] + list(range(24, 30))


def test_pyramidkv_is_snapkv_with_each_layers_budget():
    inputs = random_inputs(n=200, padding=(0, 0))
    method = PyramidKV(max_capacity_prompt=24, window_size=4)
    budgets = method.layer_budgets(4, prompt_length=200)
    assert budgets == [44, 30, 17, 5]  # 4 + ramp 39, 26.3, 13.7, 1 floored, remainder to layer 0
    for layer, budget in enumerate(budgets):
        expected = SnapKV(max_capacity_prompt=24, window_size=4).select(inputs, layer, budget)
        assert torch.equal(method.select(inputs, layer, budget), expected)


def test_original_defaults():
    snap = build_method("SnapKV", 128)
    assert (snap.window_size, snap.kernel_size, snap.pooling) == (8, 7, "maxpool")
    assert build_method("streamingLLM", 128).window_size == 124
    assert build_method("H2O", 128).pooling == "maxpool"
    assert build_method("FullKV", 128) is None
