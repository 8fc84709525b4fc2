"""Each method's choice against a slow reference written from the method's definition."""

import math

import pytest
import torch

from ntkkv.policies import H2O, PyramidKV, SelectionInputs, SnapKV, StreamingLLM, build_policy


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


def test_pyramidkv_keeps_snapkvs_choice_at_each_layers_budget():
    """Each layer's kept tokens are the definition's (window attention summed, max-pooled, top of the
    rest) at the layer's hand-computed budget."""
    n = 60
    inputs = random_inputs(n=n, padding=(0, 5))
    method = PyramidKV(max_capacity_prompt=12, window_size=4)
    budgets = method.layer_budgets(4, prompt_length=n)
    # selectable 8: top 8/20 = 0.4, bottom 16 - 0.4 = 15.6, step 5.07: 15, 10, 5, 0 floored (sum 30), the
    # 2 left over to layers 0 and 1, and at least 1 each: 4 + (16, 11, 5, 1)
    assert budgets == [20, 15, 9, 5]
    for layer, budget in enumerate(budgets):
        expected = slow_choice(inputs, snap_scores(inputs, 4), budget, 4, 7, "maxpool")
        assert torch.equal(method.select(inputs, layer, budget), expected), layer


def test_a_short_prompt_gets_pyramidkvs_uniform_budget():
    method = PyramidKV(max_capacity_prompt=12, window_size=4)
    assert method.layer_budgets(4, prompt_length=19) == [12] * 4  # shorter than the bottom layer's 20
    assert method.layer_budgets(4, prompt_length=20) == [20, 15, 9, 5]


def test_ratio_budgets_follow_each_prompts_own_length():
    method = SnapKV(max_capacity_prompt_ratio=0.25, window_size=4)
    assert method.layer_budgets(2, prompt_length=100) == [25, 25]
    assert method.layer_budgets(2, prompt_length=10) == [5, 5]  # round(2.5) = 2, raised to window + 1
    assert PyramidKV(max_capacity_prompt_ratio=0.5, window_size=4).layer_budgets(4, 24) == [20, 15, 9, 5]


def test_original_defaults():
    snap = build_policy("SnapKV", 128)
    assert (snap.window_size, snap.kernel_size, snap.pooling) == (8, 7, "maxpool")
    assert build_policy("streamingLLM", 128).window_size == 124
    assert build_policy("H2O", 128).pooling == "maxpool"
    assert build_policy("FullKV", 128) is None
