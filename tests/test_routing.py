"""Routing for the cluster summaries: spikes of the window's attention get singleton clusters, the
other clusters hold only the diffuse evicted tokens. Hand-built attention patterns against
hand-computed shares and plain-torch references, batch against alone, the options and flags, and the
end-to-end paths (dynamic and static decode, training)."""

import argparse
import math

import pytest
import torch

import ntkkv
from ntkkv.eval.needle import NeedleTest
from ntkkv.eval.options import add_compression_arguments, compression_options, run_label
from ntkkv.patch import build_compressor
from ntkkv.summaries import LayerPlan, Merge, MergeVariance, SeedTaylor, Taylor, build_summary
from ntkkv.summaries.clusters import assign_clusters
from ntkkv.summaries.routing import evicted_shares, routed_assignment
from ntkkv.training import TrainingConfig, train
from tiny import batch_with_padding, load_script, one_thread, random_prompt, tiny_model

SCALING = 1.0
D = 4


def window_along_first_axis(batch=1, queries=2):
    """Window queries e_0: a token's logit is its key's first coordinate."""
    window = torch.zeros(batch, 1, queries, D)
    window[..., 0] = 1.0
    return window


def pattern(logits: dict, n_evicted: int, kept: int, seed: int):
    """1 sample, 1 KV head: n_evicted evicted tokens then `kept` kept ones; evicted token i has logit
    logits.get(i, 0) under the window queries e_0, the other coordinates of every key are random."""
    generator = torch.Generator().manual_seed(seed)
    n = n_evicted + kept
    keys = torch.randn(1, 1, n, D, generator=generator)
    keys[..., :n_evicted, 0] = 0.0
    for token, logit in logits.items():
        keys[0, 0, token, 0] = logit
    values = torch.randn(1, 1, n, D, generator=generator)
    evicted = torch.zeros(1, 1, n, dtype=torch.bool)
    evicted[..., :n_evicted] = True
    return keys, values, evicted


# two spikes of share 9/56 each among 38 diffuse tokens of 1/56: each above 1/8 (C = 8), the top 8 together
# 24/56 < 0.5, so not concentrated
SPIKES = {9: math.log(9), 23: math.log(9)}
# four tokens of logits 5, 4.5, 4, 3.5 (positions out of order) among 16 of logit 0: shares .43, .26, .16, .10
CONCENTRATED = {11: 5.0, 2: 4.5, 17: 4.0, 5: 3.5}


def spikes_case(seed=0):
    return pattern(SPIKES, n_evicted=40, kept=4, seed=seed)


def concentrated_case(seed=1):
    return pattern(CONCENTRATED, n_evicted=20, kept=6, seed=seed)


def plan(clusters):
    return LayerPlan(memory=clusters + 6, exact=6, clusters=clusters, summary_tokens=float(clusters))


def slow_cluster_slots(keys, values, members):
    """Mean key, mean value and log n of one cluster, by plain loops over its member indices."""
    key = sum(keys[0, 0, i] for i in members) / len(members)
    value = sum(values[0, 0, i] for i in members) / len(members)
    return key, value, math.log(len(members))


def test_shares_are_the_softmax_over_the_evicted_tokens_averaged_over_the_window():
    keys, _, evicted = spikes_case()
    shares = evicted_shares(keys, evicted, window_along_first_axis(), SCALING)
    expected = torch.full((44,), 1 / 56)
    expected[[9, 23]] = 9 / 56
    expected[40:] = 0.0  # kept tokens: no share
    torch.testing.assert_close(shares[0, 0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("by", ["kmeans", "position"])
def test_spikes_become_exact_singleton_slots_and_the_other_clusters_hold_only_diffuse_tokens(by):
    keys, values, evicted = spikes_case()
    summary = Merge(cluster_by=by, route=True)
    window = window_along_first_axis()
    summarised = summary.summarise(keys, values, evicted, plan(8), 0, window, SCALING)
    assignment = summary.cluster(keys, evicted, 8, window, SCALING)[0, 0]
    # the equal shares go by position: the earlier spike first, at cluster C - r = 6
    for slot, token in ((6, 9), (7, 23)):
        assert assignment[token] == slot
        assert torch.equal(summarised.slot_keys[0, 0, slot], keys[0, 0, token])
        assert torch.equal(summarised.slot_values[0, 0, slot], values[0, 0, token])
        assert summarised.slot_bias[0, 0, slot] == 0.0
    diffuse = evicted.clone()
    diffuse[..., [9, 23]] = False
    # the 38 diffuse tokens go to clusters 0..5 exactly as plain clustering into 6 clusters puts them
    if by == "position":
        expected = torch.full((44,), -1)
        expected[diffuse[0, 0]] = torch.arange(38) * 6 // 38
    else:
        expected = assign_clusters(keys, diffuse, 6, "kmeans")[0, 0]
    assert torch.equal(torch.where(diffuse[0, 0], assignment, -1), expected)
    for slot in range(6):
        members = (expected == slot).nonzero().flatten().tolist()
        assert members and not set(members) & {9, 23}
        key, value, bias = slow_cluster_slots(keys, values, members)
        torch.testing.assert_close(summarised.slot_keys[0, 0, slot], key)
        torch.testing.assert_close(summarised.slot_values[0, 0, slot], value)
        assert summarised.slot_bias[0, 0, slot].item() == pytest.approx(bias)


def softmax_attention(query, keys, values, bias=None):
    """Plain softmax attention of one query (d,) over rows of keys/values, an optional logit bias per row."""
    logits = [SCALING * float(query @ key) + (0.0 if bias is None else float(bias[i])) for i, key in enumerate(keys)]
    top = max(logits)
    weights = [math.exp(logit - top) for logit in logits]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights), top + math.log(sum(weights))


def test_a_concentrated_head_keeps_its_top_tokens_and_merge_equals_eviction_keeping_them():
    keys, values, evicted = concentrated_case()
    window = window_along_first_axis()
    summarised = Merge(route=True).summarise(keys, values, evicted, plan(4), 0, window, SCALING)
    top = [11, 2, 17, 5]  # by descending share
    assert torch.equal(summarised.slot_keys[0, 0], keys[0, 0, top])
    assert torch.equal(summarised.slot_values[0, 0], values[0, 0, top])
    assert torch.equal(summarised.slot_bias[0, 0], torch.zeros(4))
    # the held slots (the 4 singletons, then the 6 kept tokens) read as eviction keeping those 10 tokens
    kept = list(range(20, 26))
    held_keys = torch.cat([summarised.slot_keys[0, 0], keys[0, 0, kept]])
    held_values = torch.cat([summarised.slot_values[0, 0], values[0, 0, kept]])
    held_bias = torch.cat([summarised.slot_bias[0, 0], torch.zeros(6)])
    for query in torch.randn(5, D, generator=torch.Generator().manual_seed(5)):
        ours, _ = softmax_attention(query, held_keys, held_values, held_bias)
        evicting, _ = softmax_attention(query, keys[0, 0, top + kept], values[0, 0, top + kept])
        torch.testing.assert_close(ours, evicting)
    # at concentration 1 the top four (0.95 of the mass) are not enough: only the two spikes above 1/4 stay
    assignment = Merge(route=True, concentration=1.0).cluster(keys, evicted, 4, window, SCALING)[0, 0]
    assert assignment[11] == 2 and assignment[2] == 3
    others = torch.ones(26, dtype=torch.bool)
    others[[11, 2]] = False
    others[20:] = False
    assert set(assignment[others].tolist()) <= {0, 1}


@pytest.mark.parametrize("summary", [Merge(route=True, calibrate=True), MergeVariance(route=True),
                                     Taylor(route=True, order=1), Taylor(route=True, order=2, pairs="diag"),
                                     Taylor(route=True, order=2, rank=2)], ids=repr)
def test_singletons_are_exact_for_the_training_free_summaries(summary):
    """All four clusters are singletons (concentrated): each summary's part equals exact attention over those
    four tokens (log of the total weight and mean value), as their docstrings say."""
    keys, values, evicted = concentrated_case()
    summarised = summary.summarise(keys, values, evicted, plan(4), 0, window_along_first_axis(), SCALING)
    top = [11, 2, 17, 5]
    for query in torch.randn(5, D, generator=torch.Generator().manual_seed(6)):
        expected_value, expected_log_mass = softmax_attention(query, keys[0, 0, top], values[0, 0, top])
        if summarised.state is not None:
            log_mass, value = summarised.state.read(query.view(1, 1, 1, D), SCALING)
            log_mass, value = float(log_mass), value[0, 0, 0]
        else:
            value, log_mass = softmax_attention(query, summarised.slot_keys[0, 0], summarised.slot_values[0, 0],
                                                summarised.slot_bias[0, 0])
        assert log_mass == pytest.approx(expected_log_mass, rel=1e-5)
        torch.testing.assert_close(value, expected_value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("by", ["kmeans", "position"])
def test_diffuse_attention_routes_nothing(by):
    """Uniform attention (zero window queries): no token reaches 1/C and the top C hold C/40 < 0.5."""
    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 2, 48, D, generator=generator), torch.randn(2, 2, 48, D, generator=generator)
    evicted = torch.zeros(2, 2, 48, dtype=torch.bool)
    evicted[..., :40] = True
    window = torch.zeros(2, 2, 3, D)
    routed, plain = Merge(cluster_by=by, route=True), Merge(cluster_by=by)
    assert torch.equal(routed.cluster(keys, evicted, 4, window, SCALING), plain.assign(keys, evicted, 4))
    ours = routed.summarise(keys, values, evicted, plan(4), 0, window, SCALING)
    theirs = plain.summarise(keys, values, evicted, plan(4), 0, window, SCALING)
    for name in ("slot_keys", "slot_values", "slot_bias"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))


@pytest.mark.parametrize("by", ["kmeans", "position"])
def test_a_low_threshold_leaves_a_cluster_for_the_diffuse_tokens(by):
    """spike_threshold 0.1: every one of the top C passes as a spike, but they hold C/40 < 0.5 of the mass, so
    the head is not concentrated: C − 1 singletons, and every other evicted token goes to the last cluster."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 1, 44, D, generator=generator)
    evicted = torch.zeros(1, 1, 44, dtype=torch.bool)
    evicted[..., :40] = True
    window = torch.zeros(1, 1, 2, D)  # uniform attention: every evicted token's share is 1/40
    merge = Merge(cluster_by=by, route=True, spike_threshold=0.1)
    assignment = merge.cluster(keys, evicted, 4, window, SCALING)
    assert bool((assignment[evicted] >= 0).all()) and bool((assignment[~evicted] == -1).all())
    sizes = torch.bincount(assignment[evicted], minlength=4).tolist()
    assert sorted(sizes) == [1, 1, 1, 37]  # three singletons, one cluster for the 37 others


@pytest.mark.parametrize("by", ["kmeans", "position"])
def test_a_sample_in_a_batch_is_routed_as_alone(by):
    """Sample 0 has two spikes, sample 1 is concentrated and left-padded, its padding keys so large that they
    would take every share if they counted."""
    keys0, values0, evicted0 = spikes_case()
    keys1, values1, evicted1 = concentrated_case()
    pad = 44 - 26
    keys = torch.cat([keys0, torch.cat([torch.full((1, 1, pad, D), 50.0), keys1], dim=2)])
    values = torch.cat([values0, torch.cat([torch.zeros(1, 1, pad, D), values1], dim=2)])
    evicted = torch.cat([evicted0, torch.cat([torch.zeros(1, 1, pad, dtype=torch.bool), evicted1], dim=2)])
    window = torch.cat([window_along_first_axis(), 2 * window_along_first_axis()])
    summary = Merge(cluster_by=by, route=True)
    batch = summary.summarise(keys, values, evicted, plan(8), 0, window, SCALING)
    assignment = routed_assignment(keys, evicted, 8, window, SCALING, by)
    for sample, (k, v, e) in enumerate([(keys0, values0, evicted0), (keys1, values1, evicted1)]):
        alone = summary.summarise(k, v, e, plan(8), 0, window[sample: sample + 1], SCALING)
        for name in ("slot_keys", "slot_values", "slot_bias"):
            torch.testing.assert_close(getattr(batch, name)[sample], getattr(alone, name)[0], rtol=0, atol=1e-6)
        n = k.shape[2]
        assert torch.equal(assignment[sample, :, 44 - n:], routed_assignment(k, e, 8, window[sample: sample + 1],
                                                                              SCALING, by)[0])
    assert (batch.slot_bias[0, 0] == 0).sum() >= 2 and torch.equal(batch.slot_bias[1, 0], torch.zeros(8))


# -- options, flags, results folders --------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: Merge(route="yes"), "route must be True or False, got 'yes'"),
    (lambda: Merge(route=True, spike_threshold=0), "spike_threshold must be a positive number"),
    (lambda: Merge(spike_threshold=math.inf), "spike_threshold must be a positive number"),
    (lambda: Merge(route=True, concentration=1.5), r"concentration must be a share in \(0, 1\], got 1.5"),
    (lambda: Taylor(route=True, concentration=0), r"concentration must be a share in \(0, 1\], got 0"),
    (lambda: SeedTaylor(route=True), "route applies to the summaries clustered by cluster_by, not 'seed_taylor'"),
    (lambda: build_summary("fitted", route=True), "route applies to the cluster summaries, not 'fitted'"),
    (lambda: build_summary("merge", spike_threshold=2.0), "spike_threshold applies with route=True"),
    (lambda: build_summary("merge", route=False, concentration=0.7), "concentration applies with route=True"),
    (lambda: build_summary(Merge(), route=True), "route applies to a summary named by a string"),
    (lambda: build_compressor("snapkv", 64, route=True), "route applies to a summary named by a string; no summary"),
])
def test_bad_routing_options_raise_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_summary_object_passes_through_and_routing_needs_the_window_queries():
    summary = Merge(route=True, spike_threshold=2.0)
    assert build_summary(summary) is summary
    assert build_compressor("snapkv", 64, summary=summary).summary is summary
    keys, values, evicted = spikes_case()
    with pytest.raises(ValueError, match="route=True needs the observation window's queries"):
        summary.summarise(keys, values, evicted, plan(8), 0)
    nothing = torch.zeros_like(evicted)  # a prompt that evicts nothing: no queries needed
    assert torch.equal(summary.cluster(keys, nothing, 8), torch.full(evicted.shape, -1))


def compression_parser():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    return parser


def test_flags_reach_the_summary_and_routed_runs_get_their_own_folder():
    options = compression_options(compression_parser().parse_args(
        ["--summary", "merge", "--route", "--spike_threshold", "2", "--concentration", "0.8"]))
    assert options == {"summary": "merge", "route": True, "spike_threshold": 2.0, "concentration": 0.8}
    summary = build_compressor("snapkv", 128, **options).summary
    assert (type(summary), summary.route, summary.spike_threshold, summary.concentration) == (Merge, True, 2.0, 0.8)
    plain = compression_options(compression_parser().parse_args(["--summary", "merge"]))
    assert plain == {"summary": "merge"}
    assert run_label("snapkv", plain) == "snapkv_merge"
    assert run_label("snapkv", options) == "snapkv_merge_route_st2_conc0.8"
    assert run_label("snapkv", {"summary": "merge", "route": True}) == "snapkv_merge_route"
    folders = {NeedleTest([1000], [50], method="snapkv", max_capacity_prompt=128, compress_kwargs=kwargs).model_version
               for kwargs in (plain, options, {"summary": "merge", "route": True})}
    assert len(folders) == 3
    # with summary none the routing flags mean nothing and are dropped, like the other summary flags
    assert compression_options(compression_parser().parse_args(["--summary", "none", "--route"])) == {}


@pytest.mark.parametrize("script, extra", [
    ("run_needle_in_haystack.py", ["-s", "1000", "-e", "2000", "--method", "snapkv"]),
    ("run_longbench.py", ["--method", "snapkv", "--model_path", "smollm2"]),
    ("run_ruler.py", ["--method", "snapkv", "--model_path", "smollm2"]),
])
def test_the_runners_accept_the_routing_flags(script, extra):
    args = load_script(script).parse_args([*extra, "--summary", "merge_variance", "--route",
                                           "--spike_threshold", "1.5", "--concentration", "0.6"])
    assert compression_options(args) == {"summary": "merge_variance", "route": True, "spike_threshold": 1.5,
                                         "concentration": 0.6}


def test_train_learned_map_takes_the_routing_flags():
    cli = load_script("train_learned_map.py")
    config = cli.parse_args(["--route", "--spike_threshold", "2", "--concentration", "0.9"]).config
    assert (config.route, config.spike_threshold, config.concentration) == (True, 2.0, 0.9)
    assert cli.parse_args([]).config.route is False
    with pytest.raises(SystemExit):
        cli.parse_args(["--route", "--concentration", "2"])


# -- end to end -----------------------------------------------------------------------------------

GENERATE = dict(max_new_tokens=8, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("summary, ratchet", [("merge", None), ("merge", 3), ("merge_variance", 3)])
def test_routed_summary_static_decode_equals_dynamic_and_memory_stays(summary, ratchet):
    model = tiny_model()
    prompt, mask = batch_with_padding()
    options = dict(max_capacity_prompt=32, summary=summary, state_budget=0.25, ratchet=ratchet)
    with ntkkv.compress(model, "snapkv", route=True, **options):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **GENERATE)
        static = ntkkv.generate(model, prompt, mask, decode="static", **GENERATE)
        alone = ntkkv.generate(model, prompt[2:, 52:], decode="dynamic", **GENERATE)
    with ntkkv.compress(model, "snapkv", **options):
        unrouted = ntkkv.generate(model, prompt, mask, decode="dynamic", **GENERATE)
    assert static.new_tokens == dynamic.new_tokens
    for ours, theirs in zip(static.output.logits, dynamic.output.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert alone.new_tokens[0] == dynamic.new_tokens[2]
    assert dynamic.kv_kept == unrouted.kv_kept  # equal memory: the same exact tokens and summary share
    assert dynamic.state_tokens == unrouted.state_tokens


def test_training_on_the_routed_split_runs():
    """Two steps on the tiny model: the routed objective trains (finite losses) and is recorded."""
    with one_thread():
        features = train(tiny_model(), random_prompt(192, batch=2, seed=1), random_prompt(192, batch=1, seed=2),
                         TrainingConfig(context_length=160, query_length=32, max_capacity_prompt=48, state_budget=0.5,
                                        window_size=4, num_features=8, steps=2, eval_every=1, route=True))
    metadata = features.metadata
    assert metadata["settings"]["route"] is True and metadata["settings"]["concentration"] == 0.5
    assert len(metadata["train_loss"]) == 2 and all(math.isfinite(loss) for loss in metadata["train_loss"])
    assert all(math.isfinite(row["error"]) for row in metadata["held_out"].values())
