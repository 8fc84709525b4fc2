"""Summaries of evicted tokens: each state's math against a slow reference or a hand-computed
value, the log-sum-exp merge, memory accounting by hand, empty states, the ratchet, and the errors."""

import math

import pytest
import torch

import ntkkv
from ntkkv.cache import state_sizes
from ntkkv.ops import merge_attention, reference_attention
from ntkkv.summaries import Exact, ExactState, LayerPlan, Linear, LinearState, build_summary
from ntkkv.summaries.cluster_state import ClusterState
from ntkkv.summaries.clusters import assign_clusters
from ntkkv.summaries.merge import calibrated_slots, fold_into_merged_slots, merged_slots
from ntkkv.summaries.taylor import TaylorFeatures
from ntkkv.summaries.variance import VarianceClusterState
from tiny import random_prompt, tiny_model

TRAINING_FREE = ["merge", "merge_calibrated", "merge_variance", "taylor1", "taylor2_diag", "taylor2_lowrank",
                 "seed_taylor"]
SCALING = 0.25


def clustered_keys(batch=1, heads=2, n=60, d=8, clusters=3, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, heads, clusters, d, generator=generator) * 2
    member = torch.randint(0, clusters, (batch, heads, n), generator=generator)
    keys = centres.gather(2, member[..., None].expand(-1, -1, -1, d)) + spread * torch.randn(batch, heads, n, d,
                                                                                             generator=generator)
    values = torch.randn(batch, heads, n, d, generator=generator)
    queries = torch.randn(batch, heads, 5, d, generator=generator)
    return keys, values, queries


def slow_taylor_read(queries, keys, values, assignment, order, pairs, rank=None, centred=True):
    """Σ_i exp(x·μ_c)·t(x·δ_i) v_i / Σ_i ..., one query, cluster and token at a time, with
    t(a) = 1 + a (+ a²/2, or its diagonal) and, with rank, δ projected on the top eigenvectors."""
    batch, heads, m, d = queries.shape
    log_mass = torch.empty(batch, heads, m)
    mean = torch.empty(batch, heads, m, d)
    for b in range(batch):
        for h in range(heads):
            clusters = sorted(set(assignment[b, h].tolist()) - {-1})
            for q in range(m):
                x = queries[b, h, q] * SCALING
                total, weighted = 0.0, torch.zeros(d)
                for c in clusters:
                    members = (assignment[b, h] == c).nonzero().flatten().tolist()
                    mu = keys[b, h, members].mean(0) if centred else torch.zeros(d)
                    projection = torch.eye(d)
                    if rank:
                        deltas = keys[b, h, members] - mu
                        projection = torch.linalg.eigh(deltas.T @ deltas)[1][:, -rank:]
                    numerator, normaliser = torch.zeros(d), 0.0
                    for i in members:
                        a_vec = (x @ projection) * ((keys[b, h, i] - mu) @ projection)
                        a = float(a_vec.sum())
                        quadratic = a * a / 2 if pairs == "full" else float((a_vec * a_vec).sum()) / 2
                        numerator += (1 + a + (quadratic if order == 2 else 0.0)) * values[b, h, i]
                        normaliser += 1 + (quadratic if order == 2 else 0.0)
                    scale = math.exp(float(x @ mu))
                    total += scale * normaliser
                    weighted += scale * numerator
                log_mass[b, h, q] = math.log(total)
                mean[b, h, q] = weighted / total
    return log_mass, mean


@pytest.mark.parametrize("order,pairs,rank", [(1, "full", None), (2, "full", None), (2, "diag", None), (2, "full", 3)])
@pytest.mark.parametrize("by", ["position", "kmeans"])
def test_cluster_state_reads_the_centred_taylor_expansion(order, pairs, rank, by):
    keys, values, queries = clustered_keys()
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    evicted[..., ::5] = False
    assignment = assign_clusters(keys, evicted, 3, by)
    state = ClusterState(TaylorFeatures(order, pairs), rank=rank).build(keys, values, assignment, 3)
    log_mass, mean = state.read(queries, SCALING)
    expected_log_mass, expected_mean = slow_taylor_read(queries, keys, values, assignment, order, pairs, rank)
    torch.testing.assert_close(log_mass, expected_log_mass, rtol=1e-4, atol=1e-4)
    # eigenvectors are defined up to sign, which the quadratic form does not see
    torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-4)


def test_higher_orders_approach_the_exact_kernel_as_clusters_tighten():
    """With tight clusters every order is close to exp; the error falls with the order."""
    keys, values, queries = clustered_keys(spread=0.15, seed=3)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    assignment = assign_clusters(keys, evicted, 3, "kmeans")
    exact = Exact().new_state()
    exact.fold(keys, values, evicted.float())
    exact_log_mass, exact_mean = exact.read(queries, SCALING)
    slot_keys, slot_values, slot_bias = merged_slots(keys, values, assignment, 3)
    logits = queries @ slot_keys.transpose(-1, -2) * SCALING + slot_bias[:, :, None, :]
    errors = [(logits.softmax(-1) @ slot_values - exact_mean).norm() / exact_mean.norm()]
    for order in (1, 2):
        state = ClusterState(TaylorFeatures(order, "full")).build(keys, values, assignment, 3)
        log_mass, mean = state.read(queries, SCALING)
        errors.append((mean - exact_mean).norm() / exact_mean.norm())
    assert (log_mass - exact_log_mass).abs().max() < 0.05  # order 1's mass is order 0's: only order 2 corrects it
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_merged_slot_of_identical_keys_is_exact():
    keys = torch.tensor([1.0, -2.0, 0.5]).expand(1, 1, 4, 3).clone()
    values = torch.arange(12.0).view(1, 1, 4, 3)
    slot_keys, slot_values, slot_bias = merged_slots(keys, values, torch.zeros(1, 1, 4, dtype=torch.long), 1)
    torch.testing.assert_close(slot_keys[0, 0, 0], keys[0, 0, 0])
    torch.testing.assert_close(slot_values[0, 0, 0], values[0, 0].mean(0))
    assert slot_bias.item() == pytest.approx(math.log(4))


def test_kmeans_ends_at_a_fixed_point_better_than_positional_runs():
    keys, _, _ = clustered_keys(n=90, seed=5)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    evicted[..., -10:] = False

    def within_cluster_error(assignment):
        total = 0.0
        for h in range(2):
            for c in range(3):
                members = keys[0, h][assignment[0, h] == c]
                total += float(((members - members.mean(0)) ** 2).sum()) if len(members) else 0.0
        return total

    by_kmeans = assign_clusters(keys, evicted, 3, "kmeans", iterations=50)
    by_position = assign_clusters(keys, evicted, 3, "position")
    assert (by_kmeans[..., -10:] == -1).all() and (by_kmeans[..., :-10] >= 0).all()
    assert within_cluster_error(by_kmeans) < 0.5 * within_cluster_error(by_position)
    # every evicted key sits in the cluster of its nearest centre
    for b, h in [(0, 0), (0, 1)]:
        centres = torch.stack([keys[b, h][by_kmeans[b, h] == c].mean(0) for c in range(3)])
        nearest = torch.cdist(keys[b, h, :-10], centres).argmin(-1)
        assert torch.equal(nearest, by_kmeans[b, h, :-10])
    # positional runs are contiguous and of equal size
    assert by_position[0, 0, :-10].tolist() == [0] * 27 + [1] * 26 + [2] * 27 or \
        sorted(by_position[0, 0, :-10].bincount().tolist()) in ([26, 27, 27], [26, 26, 28])


def test_seed_state_is_the_uncentred_diagonal_taylor_map_with_its_clamp():
    keys, values, queries = clustered_keys(spread=0.5, seed=2)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    summary = build_summary("seed_taylor")
    plan = summary.plan(400, keys.shape[-1])
    state = summary.summarise(keys, values, evicted, plan, 0).state
    log_mass, mean = state.read(queries, SCALING)
    for q in range(queries.shape[2]):
        x = queries[0, 0, q] * SCALING
        terms = [1 + float(x @ k) + float(((x * k) ** 2).sum()) / 2 for k in keys[0, 0]]
        normaliser = max(sum(terms), 1e-6)
        ratio = sum(t * v for t, v in zip(terms, values[0, 0])) / normaliser
        ratio = torch.minimum(torch.maximum(ratio, values[0, 0].amin(0)), values[0, 0].amax(0))
        assert log_mass[0, 0, q].item() == pytest.approx(math.log(normaliser), rel=1e-4)
        torch.testing.assert_close(mean[0, 0, q], ratio, rtol=1e-4, atol=1e-4)


# -- the log-sum-exp merge and states without clusters -----------------------------------------

def test_merge_of_two_halves_is_attention_over_the_whole():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=generator), torch.randn(1, 2, 20, 8, generator=generator),
               torch.randn(1, 2, 20, 8, generator=generator))
    scale = 8**-0.5
    full = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    lse_a, out_a = reference_attention(q, k[:, :, :7], v[:, :, :7], torch.zeros(1, 2, 3, 7), scale)
    state = ExactState()
    state.fold(k[:, :, 7:], v[:, :, 7:], torch.ones(1, 2, 13))
    log_mass, mean = state.read(q, scale)
    torch.testing.assert_close(merge_attention(lse_a, out_a, log_mass, mean), full, rtol=1e-5, atol=1e-5)


def test_merge_by_hand():
    # kept part: total weight 3, mean 1.0; state: total weight 1, mean 5.0 -> (3*1 + 1*5) / 4 = 2
    merged = merge_attention(torch.tensor([math.log(3.0)]), torch.tensor([[1.0]]),
                             torch.tensor([0.0]), torch.tensor([[5.0]]))
    assert merged.item() == pytest.approx(2.0)
    empty = merge_attention(torch.tensor([0.3]), torch.tensor([[1.5]]), torch.tensor([-math.inf]),
                            torch.tensor([[9.0]]))
    assert empty.item() == 1.5


def elu_features(x, scaling):
    return torch.nn.functional.elu(x * math.sqrt(scaling)) + 1


def test_linear_state_reads_phi_q_s_over_phi_q_z():
    generator = torch.Generator().manual_seed(1)
    k, v, q = torch.randn(1, 1, 5, 4, generator=generator), torch.randn(1, 1, 5, 4,
                          generator=generator), torch.randn(1, 1, 2, 4, generator=generator)
    weights = torch.tensor([[[1.0, 0.0, 1.0, 1.0, 0.0]]])
    state = LinearState(elu_features)
    state.fold(k[:, :, :2], v[:, :, :2], weights[:, :, :2])
    state.fold(k[:, :, 2:], v[:, :, 2:], weights[:, :, 2:])
    log_mass, mean = state.read(q, 0.25)
    for i in range(2):
        phi_q = elu_features(q[0, 0, i], 0.25)
        w = [float(phi_q @ elu_features(k[0, 0, j], 1.0)) * float(weights[0, 0, j]) for j in range(5)]
        expected_mean = sum(w[j] * v[0, 0, j] for j in range(5)) / sum(w)
        assert log_mass[0, 0, i].item() == pytest.approx(math.log(sum(w)), rel=1e-5)
        torch.testing.assert_close(mean[0, 0, i], expected_mean, rtol=1e-5, atol=1e-5)
    assert state.size_in_tokens() == (4 * 4 + 4) / 8  # F·d + F numbers, a token is 2·d


def test_linear_summary_with_empty_state_equals_eviction():
    model = tiny_model()
    prompt = random_prompt(40)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64):
        evicting = ntkkv.generate(model, prompt, max_new_tokens=6).new_tokens
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, summary=Linear(elu_features)):
        result = ntkkv.generate(model, prompt, max_new_tokens=6)
    assert result.new_tokens == evicting
    assert all(layer.state is not None and float(layer.state.normaliser.abs().sum()) == 0
               for layer in result.cache.layers)


def test_a_linear_state_holds_the_evicted_tokens_and_is_read_at_decode():
    model = tiny_model()
    prompt = random_prompt(120)
    options = dict(max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=16):
        evicting = ntkkv.generate(model, prompt, **options)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=25, summary=Linear(elu_features)):
        merged = ntkkv.generate(model, prompt, **options)  # 16 exact tokens + 8.5 of state
    assert all(layer.state.size_in_tokens() == (16 * 16 + 16) / 32 for layer in merged.cache.layers)
    assert all(float(layer.state.normaliser.sum()) > 0 for layer in merged.cache.layers)
    # the prefill's own logits come from full attention in both; the decode steps read the state
    assert torch.equal(merged.output.logits[0], evicting.output.logits[0])
    assert not torch.allclose(merged.output.logits[1], evicting.output.logits[1])



# -- memory accounting -------------------------------------------------------------------------

# budget 96 on the tiny model (4 layers, head_dim 16), a state share of 1/2, a 300-token prompt:
# 48 token equivalents go to the summary, and (exact tokens, summary memory) per layer is, by hand:
#   merge           1 token a cluster: 48 clusters, 48 exact
#   merge_variance  (3·16 + 1)/32 = 1.53125 a cluster: 31 clusters = 47.47, ceil 48, so 48 exact
#   taylor1         (16 μ + 1 n + 1 z + 17·16 S)/32 = 9.0625 a cluster: 5 clusters = 45.31, so 50 exact
# PyramidKV's layers get 180, 124, 68, 12 (the ramp of test_core); half of each is the share, except the
# top layer, whose exact tokens cannot fall under window + 1 = 9 (3 clusters)
BY_HAND = {
    ("snapkv", "merge"): [(48, 48.0)] * 4,
    ("snapkv", "merge_variance"): [(48, 31 * 49 / 32)] * 4,
    ("snapkv", "taylor1"): [(50, 5 * 290 / 32)] * 4,
    ("streamingllm", "merge"): [(48, 48.0)] * 4,
    ("pyramidkv", "merge"): [(90, 90.0), (62, 62.0), (34, 34.0), (9, 3.0)],
}


@pytest.mark.parametrize("method, summary", BY_HAND)
def test_exact_tokens_and_summary_memory_are_the_hand_computed_plan(method, summary):
    model = tiny_model()
    with ntkkv.compress(model, method, max_capacity_prompt=96, summary=summary, state_budget=0.5):
        result = ntkkv.generate(model, random_prompt(300), max_new_tokens=1)
    held = list(zip(result.kv_kept[0], state_sizes(result.cache)))
    assert [tokens for tokens, _ in held] == [tokens for tokens, _ in BY_HAND[method, summary]]
    assert [state for _, state in held] == pytest.approx([state for _, state in BY_HAND[method, summary]])


@pytest.mark.parametrize("summary", TRAINING_FREE)
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streamingllm", "h2o"])
def test_exact_tokens_plus_summary_never_exceed_the_budget(summary, method):
    model = tiny_model()
    budgets = [180, 124, 68, 12] if method == "pyramidkv" else [96] * 4
    with ntkkv.compress(model, method, max_capacity_prompt=96, summary=summary, state_budget=0.5):
        result = ntkkv.generate(model, random_prompt(300), max_new_tokens=1)
    for budget, tokens, state in zip(budgets, result.kv_kept[0], state_sizes(result.cache)):
        assert tokens + state <= budget
        assert tokens > (4 if method == "streamingllm" else 8)  # more than the window (StreamingLLM: its 4 sinks)


def test_state_sizes_count_every_number_held():
    """Token equivalents = numbers held / (2·head_dim), counted on the tensors themselves."""
    keys, values, _ = clustered_keys(d=8)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    for name in ["taylor1", "taylor2", "taylor2_diag", "taylor2_lowrank", "seed_taylor"]:
        summary = build_summary(name, state_budget=5000)
        plan = summary.plan(6000, 8)
        state = summary.summarise(keys, values, evicted, plan, 0).state
        held = [state.means if state.centred else None, state.projection, state.counts, state.normaliser,
                state.numerator, state.value_min, state.value_max]
        numbers = sum(t[0, 0].numel() for t in held if t is not None)
        assert state.size_in_tokens() == pytest.approx(numbers / 16) == pytest.approx(plan.summary_tokens)


def test_a_state_never_squeezes_the_exact_tokens_below_the_window():
    model = tiny_model()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, summary="merge", state_budget=60):
        result = ntkkv.generate(model, random_prompt(100), max_new_tokens=1)
    assert result.kv_kept[0] == [9] * 4 and state_sizes(result.cache) == [55.0] * 4


def test_summary_plans():
    assert build_summary("merge", state_budget=0.25).plan(128, 64) == LayerPlan(128, 96, 32, 32.0)
    assert build_summary("merge", state_budget=16).plan(128, 64).exact == 112
    taylor1 = build_summary("taylor1", state_budget=0.5).plan(128, 64)
    assert (taylor1.clusters, taylor1.summary_tokens) == (1, (64 + 1 + 1 + 65 * 64) / 128)
    lowrank = build_summary("taylor2_lowrank", state_budget=0.25).plan(128, 64)  # 15 features at rank 4
    assert lowrank.clusters == math.floor(32 / ((64 + 64 * 4 + 1 + 11 + 15 * 64) / 128))


# -- in the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("summary", TRAINING_FREE)
def test_empty_state_equals_eviction(summary):
    """A prompt within the exact budget evicts nothing: same tokens as plain eviction."""
    model = tiny_model()
    prompt = random_prompt(40)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=128):
        evicting = ntkkv.generate(model, prompt, max_new_tokens=6).new_tokens
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=128, summary=summary, state_budget=0.5):
        result = ntkkv.generate(model, prompt, max_new_tokens=6)
    assert result.new_tokens == evicting
    assert result.kv_kept[0] == [40] * 4


@pytest.mark.parametrize("summary", ["merge", "taylor2_diag"])
def test_a_summary_brings_decode_closer_to_full_attention(summary):
    model = tiny_model()
    prompt = random_prompt(200, seed=4)
    options = dict(max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    full = torch.stack(ntkkv.generate(model, prompt, **options).output.logits[1:])
    runs = {}
    for name in ("none", summary):
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=80, summary=name, state_budget=0.5):
            result = ntkkv.generate(model, prompt, **options)
        # the same tokens fed in both runs would be cleaner; the first decode step already differs
        runs[name] = (result.output.logits[1] - full[0]).norm() / full[0].norm()
    assert runs[summary] < runs["none"]


def test_ratchet_with_the_exact_summary_is_full_attention_and_memory_stays_flat():
    """Generated tokens past the ratchet fold into the state: with exp computed exactly, every step
    equals full attention (so positions stay right) while the exact slots stay flat."""
    model = tiny_model("mistral")
    prompt = random_prompt(60, batch=2, seed=8)
    mask = torch.ones_like(prompt)
    mask[1, :12] = 0
    steps = 12
    options = dict(max_new_tokens=steps, min_new_tokens=steps, output_logits=True, return_dict_in_generate=True)
    reference = ntkkv.generate(model, prompt, mask, **options)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=20, summary=Exact(), ratchet=3):
        result = ntkkv.generate(model, prompt, mask, **options)
    torch.testing.assert_close(torch.stack(result.output.logits), torch.stack(reference.output.logits),
                               rtol=1e-4, atol=1e-4)
    for layer in result.cache.layers:
        assert layer.num_slots() == 20 + 3
        assert layer.get_seq_length() == 60 + steps - 1
        assert layer.state.keys.shape[-2] == 60 + steps - 1 - 3  # the exact state keeps every token it got


@pytest.mark.parametrize("summary", ["none", "merge", "merge_variance", "taylor2_lowrank", "seed_taylor"])
def test_ratchet_keeps_memory_flat(summary):
    model = tiny_model()
    memory = []
    for steps in (6, 16):
        with ntkkv.compress(model, "streamingllm", max_capacity_prompt=64, summary=summary, state_budget=0.5,
                            ratchet=4):
            result = ntkkv.generate(model, random_prompt(150), max_new_tokens=steps, min_new_tokens=steps)
        memory.append([(layer.num_slots(), layer.state_tokens(), layer.get_seq_length())
                       for layer in result.cache.layers])
    for short, long in zip(*memory):
        assert short[:2] == long[:2]  # slots and state size
        assert long[2] - short[2] == 10  # logical length (RoPE positions) still counts every token


def test_ratchet_starts_merged_slots_when_the_prompt_fit():
    model = tiny_model()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, summary="merge", state_budget=8, ratchet=2):
        result = ntkkv.generate(model, random_prompt(30), max_new_tokens=12, min_new_tokens=12)
    for layer in result.cache.layers:
        assert layer.merged_slots == 8 and layer.num_slots() == 8 + 30 + 2
        counts = layer.bias[0, :, :8].exp().sum(-1)
        assert torch.equal(counts, torch.full_like(counts, 12 - 1 - 2))


def test_fold_into_merged_slots_keeps_running_means():
    slot_keys = torch.tensor([[[[0.0, 0.0], [10.0, 10.0]]]])
    slot_values = torch.tensor([[[[1.0, 1.0], [5.0, 5.0]]]])
    slot_bias = torch.tensor([[[0.0, math.log(3)]]])
    fold_into_merged_slots(slot_keys, slot_values, slot_bias, torch.tensor([[[[9.0, 9.0]]]]),
                           torch.tensor([[[[1.0, 9.0]]]]))
    torch.testing.assert_close(slot_keys[0, 0, 1], torch.tensor([9.75, 9.75]))
    torch.testing.assert_close(slot_values[0, 0, 1], torch.tensor([4.0, 6.0]))
    assert slot_bias[0, 0].exp().tolist() == pytest.approx([1.0, 4.0])


def test_results_labels_name_the_summary_under_old_and_new_names():
    from ntkkv.eval.options import run_label

    assert run_label("snapkv", {}) == "snapkv"
    assert run_label("snapkv", {"summary": "none"}) == "snapkv"
    assert run_label("pyramidkv", {"summary": "taylor2_lowrank", "state_budget": 0.25, "rank": 8}) == \
        "pyramidkv_taylor2_lowrank_sb0.25_r8"
    # the flags of before the rename give the same folder names
    assert run_label("snapkv", {"kernel": "merge", "state_budget": 0.125}) == "snapkv_merge_sb0.125"
    assert run_label("snapkv", {"kernel": "learned", "kernel_path": "assets/smollm2_learned_f2.pt"}) == \
        "snapkv_learned_smollm2_learned_f2"
    assert run_label("snapkv", {"kernel": "ratchetkv"}) == "snapkv_seed_taylor"


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(summary="taylor3"), "unknown summary 'taylor3'; choose one of: none, merge"),
    (dict(summary="merge", state_budget=-1), "state_budget must be a fraction in (0, 1) or a number of tokens"),
    (dict(summary="merge", cluster_by="random"), "unknown cluster_by 'random'; choose one of: position, kmeans"),
    (dict(summary="merge", rank=4), "rank applies to summary taylor2_lowrank, not 'merge'"),
    (dict(summary="merge", summary_path="x.pt"), "summary_path applies to summary learned, not 'merge'"),
    (dict(summary="learned"), "summary 'learned' needs summary_path"),
    (dict(summary="learned", summary_path="/nonexistent.pt"), "learned map file '/nonexistent.pt' does not exist"),
    (dict(kernel="learned", kernel_path="/nonexistent.pt"), "learned map file '/nonexistent.pt' does not exist"),
    (dict(kernel="merge", summary="taylor1"), "kernel='merge' and summary='taylor1' name the same option"),
    (dict(summary="merge", ratchet=-2), "ratchet must be a number of generated tokens"),
    (dict(summary="merge", widow_size=4), "unknown option widow_size"),
    (dict(summary=Exact(), state_budget=0.5), "state_budget applies to a summary named by a string"),
    (dict(summary="taylor2", state_budget=0.5), "summary 'taylor2': no layer's state budget holds a cluster (one costs "
                                                "81.3 tokens at head_dim 16"),
])
def test_summary_errors_name_the_bad_value(kwargs, message):
    model = tiny_model()
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=64, **kwargs):
            pass
    assert message in str(error.value)


def test_calibrated_slots_are_exact_for_the_one_query_they_were_fitted_to():
    """Bias and value fitted to a single window query reproduce that query's exact attention
    over each cluster; another query gets an approximation."""
    keys, values, queries = clustered_keys(spread=0.8, seed=6)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    assignment = assign_clusters(keys, evicted, 3, "kmeans")
    fitted = queries[:, :, :1]
    slot_keys, slot_values, slot_bias = calibrated_slots(keys, values, assignment, 3, fitted, SCALING)
    exact = Exact().new_state()
    exact.fold(keys, values, evicted.float())
    exact_log_mass, exact_mean = exact.read(queries, SCALING)
    logits = queries @ slot_keys.transpose(-1, -2) * SCALING + slot_bias[:, :, None, :]
    torch.testing.assert_close(logits.logsumexp(-1)[:, :, 0], exact_log_mass[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((logits.softmax(-1) @ slot_values)[:, :, 0], exact_mean[:, :, 0], rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose((logits.softmax(-1) @ slot_values)[:, :, 1:], exact_mean[:, :, 1:], atol=1e-3)


def test_calibrated_slots_match_a_per_cluster_loop_with_kept_tokens_and_an_empty_cluster():
    """Bias = mean over the window of log Σ_{i∈c} exp(s·q·δ_i), value = Σ_{i∈c} (mean softmax
    within c) v_i, written out one sample, head and cluster at a time."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, n, d, clusters, w = 2, 2, 30, 8, 4, 5
    keys = torch.randn(batch, heads, n, d, generator=generator)
    values = torch.randn(batch, heads, n, d, generator=generator)
    queries = torch.randn(batch, heads, w, d, generator=generator) * 2
    assignment = torch.randint(0, clusters - 1, (batch, heads, n), generator=generator)  # cluster 3 empty
    assignment[:, :, ::4] = -1  # kept tokens
    slot_keys, slot_values, slot_bias = calibrated_slots(keys, values, assignment, clusters, queries, SCALING)
    for b in range(batch):
        for h in range(heads):
            for c in range(clusters):
                members = (assignment[b, h] == c).nonzero().flatten().tolist()
                if not members:
                    assert slot_bias[b, h, c] == -math.inf
                    assert torch.all(slot_values[b, h, c] == 0)
                    continue
                mean_key = sum(keys[b, h, i] for i in members) / len(members)
                log_masses, attention = [], torch.zeros(len(members))
                for q in queries[b, h]:
                    scores = torch.tensor([float(q @ (keys[b, h, i] - mean_key)) * SCALING for i in members])
                    log_masses.append(math.log(sum(math.exp(x) for x in scores.tolist())))
                    attention += scores.softmax(0) / w
                value = sum(a * values[b, h, i] for a, i in zip(attention, members))
                torch.testing.assert_close(slot_keys[b, h, c], mean_key)
                assert slot_bias[b, h, c].item() == pytest.approx(sum(log_masses) / w, rel=1e-5)
                torch.testing.assert_close(slot_values[b, h, c], value, rtol=1e-5, atol=1e-6)


def test_variance_state_reads_the_second_cumulant_and_folds_like_a_rebuild():
    keys, values, queries = clustered_keys(spread=0.5, seed=9)
    evicted = torch.ones(keys.shape[:3], dtype=torch.bool)
    assignment = assign_clusters(keys, evicted, 3, "kmeans")
    state = VarianceClusterState(variance_scale=0.7).build(keys, values, assignment, 3)
    log_mass, mean = state.read(queries, SCALING)
    for h in range(2):
        for q in range(queries.shape[2]):
            x = queries[0, h, q] * SCALING
            masses, means = [], []
            for c in range(3):
                members = keys[0, h][assignment[0, h] == c]
                variance = members.var(dim=0, unbiased=False)
                exponent = float(x @ members.mean(0)) + 0.7 * 0.5 * float((x * x) @ variance)
                masses.append(len(members) * math.exp(exponent))
                means.append(values[0, h][assignment[0, h] == c].mean(0))
            assert log_mass[0, h, q].item() == pytest.approx(math.log(sum(masses)), rel=1e-5)
            expected = sum(m * v for m, v in zip(masses, means)) / sum(masses)
            torch.testing.assert_close(mean[0, h, q], expected, rtol=1e-4, atol=1e-5)
    # one cluster: building on 40 tokens then folding 20 = building on all 60
    one = torch.zeros_like(assignment)
    grown = VarianceClusterState().build(keys[:, :, :40], values[:, :, :40], one[:, :, :40], 1)
    grown.fold(keys[:, :, 40:], values[:, :, 40:])
    whole = VarianceClusterState().build(keys, values, one, 1)
    for name in ("means", "mean_values", "variances", "counts"):
        torch.testing.assert_close(getattr(grown, name), getattr(whole, name), rtol=1e-4, atol=1e-5)


def test_ratchet_folds_into_the_planned_slots_and_a_plainly_evicting_layer_drops():
    """PyramidKV's top layer gets too small a share for a merged slot: it evicts plainly, and the
    ratchet drops its old tokens there; the other layers fold into exactly their planned slots."""
    model = tiny_model()
    with ntkkv.compress(model, "pyramidkv", max_capacity_prompt=64, summary="merge", state_budget=0.05, ratchet=2):
        result = ntkkv.generate(model, random_prompt(300), max_new_tokens=10, min_new_tokens=10)
    # budgets 118, 82, 46, 10 (test_core); 5% of each, floored: 5.9, 4.1, 2.3, 0.5 merged slots
    planned = [5, 4, 2, 0]
    for layer, clusters in zip(result.cache.layers, planned):
        assert layer.merged_slots == clusters == layer.planned_clusters
        folded = layer.bias[0, :, :clusters].exp().sum(-1) if clusters else None
        assert clusters == 0 or bool((folded > 0).all())
        assert layer.appended_slots() == 2
