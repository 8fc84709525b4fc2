"""The kept slots fitted beside a summary's state (`fit_kept=True`): the fit against a float64 reference
written from its definition, nothing changed beside an exact state, never worse than the state and
slots unfitted on the reference queries, a sample in a batch as alone, the same memory as the summary
unfitted, training the learned map through the fit, and the flags."""

import argparse
import math

import numpy as np
import pytest
import torch
from test_fitted import SCALING, gather, random_case

import ntkkv
from ntkkv.cache import state_sizes
from ntkkv.eval.options import add_compression_arguments, check_run, compression_options, run_label
from ntkkv.models import attention_modules
from ntkkv.summaries import ExactState, Fitted, Learned, Taylor, build_summary
from ntkkv.summaries.fit import DEFAULT_MIN_WEIGHT, DEFAULT_RIDGE
from ntkkv.summaries.learned import LearnedFeatures
from ntkkv.training import TrainingConfig, format_table, mean_loss, train
from tiny import long_and_short, one_thread, random_prompt, tiny_model


class GivenState:
    """A state that gives each reference query a fixed log-mass and mean value (the fit reads nothing else)."""

    def __init__(self, log_mass, mean):
        self.log_mass, self.mean = log_mass, mean

    def read(self, queries, scaling):
        assert queries.shape[:3] == self.log_mass.shape
        return self.log_mass, self.mean


def given_state(keys, values, evicted, reference, seed, mass_noise=1.0, mean_noise=None):
    """log-mass: the evicted tokens' true log-mass off by a random factor exp(±mass_noise); mean: their true
    attention mean plus Gaussian noise of scale mean_noise (None: a random value, unrelated to them)."""
    generator = torch.Generator().manual_seed(100 + seed)
    logits = ((reference @ keys.transpose(-1, -2)) * SCALING).masked_fill(~evicted[:, :, None], -math.inf)
    true = logits.logsumexp(dim=-1)
    log_mass = true + mass_noise * (2 * torch.rand(true.shape, generator=generator) - 1)
    if mean_noise is None:
        return GivenState(log_mass, torch.randn(*true.shape, values.shape[-1], generator=generator))
    mean = torch.softmax(logits, dim=-1) @ values
    return GivenState(log_mass, mean + mean_noise * torch.randn(mean.shape, generator=generator))


def ridge_solve(design, rhs, ridge):
    """argmin ‖design·x − rhs‖² + λ‖x‖², λ = ridge × ‖design‖²_F / columns, in float64."""
    lam = ridge * (design**2).sum() / design.shape[1]
    return np.linalg.solve(design.T @ design + lam * np.eye(design.shape[1]), design.T @ rhs)


def slow_fit(keys, values, kept, bias, evicted, reference, state):
    """The fit of one (sample, KV head) at a time in float64 numpy, from the definition: the weights w with
    Σ_j p_ij w_j + p_state,i ≈ 1, clamped, kept only if the mass fits better; then values V' with
    x_i·V' + x_state,i·m_i ≈ y_i (x the softmax over the slots and the state); kept only if the error
    over the reference queries beats the slots and state unfitted. Returns (values, bias) as the compressor's."""
    batch, kv_heads, k = kept.shape
    out_values = gather(values, kept).double().clone()
    out_bias = bias.double().clone()
    log_mass, mean = (t.double().numpy() for t in state.read(reference, SCALING))
    for b in range(batch):
        for h in range(kv_heads):
            slots = [j for j in range(k) if bias[b, h, j] > -math.inf]
            real = sorted(set(evicted[b, h].nonzero().flatten().tolist()) | {int(kept[b, h, j]) for j in slots})
            if not evicted[b, h].any():
                continue
            q = reference[b, h].double().numpy()
            key, value = keys[b, h].double().numpy(), values[b, h].double().numpy()
            logits = SCALING * q @ key[real].T
            top = logits.max(axis=1, keepdims=True)
            log_total = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
            targets = np.exp(logits - log_total[:, None]) @ value[real]
            at_kept = SCALING * q @ key[kept[b, h, slots].numpy()].T
            slot_values = value[kept[b, h, slots].numpy()]
            shares = np.exp(at_kept - log_total[:, None])
            missing = 1 - shares.sum(axis=1) - np.exp(log_mass[b, h] - log_total)
            weights = np.maximum(1 + ridge_solve(shares, missing, DEFAULT_RIDGE), DEFAULT_MIN_WEIGHT)
            if ((shares @ (weights - 1) - missing) ** 2).sum() > (missing**2).sum():
                weights = np.ones(len(slots))

            def read(logit_rows, slot_values):
                joined = np.concatenate([logit_rows, log_mass[b, h][:, None]], axis=1)
                attention = np.exp(joined - joined.max(axis=1, keepdims=True))
                attention /= attention.sum(axis=1, keepdims=True)
                return attention[:, :-1], attention[:, :-1] @ slot_values + attention[:, -1:] * mean[b, h]

            attention, output = read(at_kept + np.log(weights), slot_values)
            fitted = slot_values + ridge_solve(attention, targets - output, DEFAULT_RIDGE)
            fitted_error = ((read(at_kept + np.log(weights), fitted)[1] - targets) ** 2).sum()
            unfitted_error = ((read(at_kept, slot_values)[1] - targets) ** 2).sum()
            if fitted_error <= unfitted_error:
                out_values[b, h, slots] = torch.from_numpy(fitted)
                out_bias[b, h, slots] += torch.from_numpy(np.log(weights))
    return out_values, out_bias


def errors_with_state(keys, values, kept, bias, evicted, reference, state, slot_values, slot_bias):
    """Per (sample, KV head): Σ over the reference queries of ‖o − o_full‖², o over the slots and the state."""
    logits = (reference @ keys.transpose(-1, -2)).double() * SCALING
    real = evicted.clone().scatter_(2, kept, bias > -math.inf)
    full = torch.softmax(logits.masked_fill(~real[:, :, None], -math.inf), dim=-1) @ values.double()
    at_kept = (reference.double() @ gather(keys, kept).double().transpose(-1, -2)) * SCALING + slot_bias.double()[
        :, :, None]
    log_mass, mean = state.read(reference, SCALING)
    attention = torch.softmax(torch.cat([at_kept, log_mass.double()[..., None]], dim=-1), dim=-1)
    output = attention[..., :-1] @ slot_values.double() + attention[..., -1:] * mean.double()
    return (output - full).square().sum(dim=(-2, -1))


# -- the fit beside a state ----------------------------------------------------------------------

@pytest.mark.parametrize("queries", [5, 30])
def test_the_fit_beside_a_state_follows_its_definition(queries):
    """Fewer and more reference queries than kept slots, with left padding and padding slots."""
    for seed in range(3):
        keys, values, kept, bias, evicted, reference = random_case(seed, queries=queries)
        state = given_state(keys, values, evicted, reference, seed)
        fitted_values, fitted_bias = Taylor(order=1, fit_kept=True).refit(keys, values, kept, bias, evicted,
                                                                          reference, SCALING, 0, state=state)
        expected_values, expected_bias = slow_fit(keys, values, kept, bias, evicted, reference, state)
        assert not torch.equal(fitted_values, gather(values, kept))  # the fit did something
        torch.testing.assert_close(fitted_values.double(), expected_values, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(fitted_bias.double(), expected_bias, atol=2e-4, rtol=2e-4)


def test_beside_an_exact_state_of_the_evicted_tokens_nothing_changes():
    """Slots and an exact state of the evicted tokens are full attention: nothing is missing, nothing to fit."""
    keys, values, kept, bias, evicted, reference = random_case(4, queries=20)
    state = ExactState()
    state.fold(keys, values, evicted.float())
    fitted_values, fitted_bias = Learned(features=LearnedFeatures(1, 2, 8, 2), fit_kept=True).refit(
        keys, values, kept, bias, evicted, reference, SCALING, 0, state=state)
    torch.testing.assert_close(fitted_values, gather(values, kept), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-5, rtol=0)
    assert torch.equal(fitted_bias[1, :, :3], bias[1, :, :3])  # padding slots stay -inf


def test_beside_a_state_of_no_mass_it_is_fitted_compaction():
    keys, values, kept, bias, evicted, reference = random_case(5, queries=16)
    empty = GivenState(torch.full(reference.shape[:3], -math.inf), torch.zeros(reference.shape))
    beside = Taylor(order=1, fit_kept=True).refit(keys, values, kept, bias, evicted, reference, SCALING, 0, state=empty)
    alone = Fitted().refit(keys, values, kept, bias, evicted, reference, SCALING, 0)
    for ours, theirs in zip(beside, alone):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries", [6, 12, 30])
def test_beside_a_state_never_worse_than_the_state_and_slots_unfitted(queries):
    """States close to the evicted tokens' attention and states unrelated to it: per sample and KV head the
    fit's error on the reference queries is at most the unfitted one's; with fewer queries than slots and a
    state near the truth, it is lower."""
    ratios = []
    for seed in range(6):
        keys, values, kept, bias, evicted, reference = random_case(seed, queries=queries)
        for noise in ({"mass_noise": 0.5, "mean_noise": 0.3}, {"mass_noise": 2.0, "mean_noise": None}):
            state = given_state(keys, values, evicted, reference, seed, **noise)
            fitted_values, fitted_bias = Taylor(order=1, fit_kept=True).refit(keys, values, kept, bias, evicted,
                                                                              reference, SCALING, 0, state=state)
            fitted = errors_with_state(keys, values, kept, bias, evicted, reference, state, fitted_values,
                                       fitted_bias)
            unfitted = errors_with_state(keys, values, kept, bias, evicted, reference, state, gather(values, kept),
                                         bias)
            assert (fitted <= unfitted * (1 + 1e-5) + 1e-9).all()
            if noise["mean_noise"] is not None:
                ratios.append(fitted / unfitted)
    if queries == 6:
        assert torch.cat(ratios).mean() < 0.85


def test_beside_a_state_a_sample_is_fitted_in_a_batch_as_alone():
    keys, values, kept, bias, evicted, reference = random_case(6)
    state = given_state(keys, values, evicted, reference, 6)
    summary = Taylor(order=1, fit_kept=True)
    together = summary.refit(keys, values, kept, bias, evicted, reference, SCALING, 0, state=state)
    pad, short = 9, 3
    alone = summary.refit(keys[1:, :, pad:], values[1:, :, pad:], kept[1:, :, short:] - pad, bias[1:, :, short:],
                          evicted[1:, :, pad:], reference[1:], SCALING, 0,
                          state=GivenState(state.log_mass[1:], state.mean[1:]))
    torch.testing.assert_close(together[0][1:, :, short:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1][1:, :, short:], alone[1], atol=1e-5, rtol=1e-5)


# -- in the model ------------------------------------------------------------------------------

def test_same_memory_as_the_summary_unfitted_and_closer_to_full_attention():
    """merge_variance with and without the fit: the same slots and state sizes; the fit brings the next
    token's logits closer to full attention's. (Beside taylor1, whose state is nearly exact on this random
    model, it does not: the fit serves the window's queries, and the next token's are others.)"""
    model = tiny_model()
    prompt = random_prompt(200, seed=4)
    options = dict(max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    full = ntkkv.generate(model, prompt, **options).output.logits[1]
    held, errors = {}, {}
    for fit in (False, True):
        with ntkkv.compress(model, "snapkv", max_capacity_prompt=80, summary="merge_variance", state_budget=0.25,
                            fit_kept=fit):
            result = ntkkv.generate(model, prompt, **options)
        held[fit] = (result.kv_kept, state_sizes(result.cache))
        errors[fit] = float((result.output.logits[1] - full).norm() / full.norm())
    assert held[True] == held[False] and all(size > 0 for size in held[True][1])
    assert errors[True] < 0.9 * errors[False]


def test_left_padded_batch_gives_each_sample_its_alone_output():
    model = tiny_model()
    batch, mask, long_prompt, short_prompt = long_and_short()
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=32, summary="merge_variance", state_budget=0.25,
                        route=True, fit_kept=True):
        together = ntkkv.generate(model, batch, mask, max_new_tokens=8, min_new_tokens=8)
        alone = [ntkkv.generate(model, p, max_new_tokens=8, min_new_tokens=8) for p in (long_prompt, short_prompt)]
    assert together.new_tokens == [alone[0].new_tokens[0], alone[1].new_tokens[0]]


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="fit_kept must be True or False, got 'yes'"):
        build_summary("taylor1", fit_kept="yes")
    with pytest.raises(ValueError, match="summary 'merge' makes merged slots, not a state"):
        build_summary("merge", fit_kept=True)
    with pytest.raises(ValueError, match="fit_kept applies to the cluster summaries, not 'fitted'"):
        build_summary("fitted", fit_kept=True)
    with pytest.raises(ValueError, match="fit_kept must be True or False"):
        TrainingConfig(fit_kept=1)


def test_runner_flag_and_label():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    config = tiny_model().config
    options = compression_options(parser.parse_args(["--summary", "merge_variance", "--route", "--fit_kept"]))
    assert options == {"summary": "merge_variance", "route": True, "fit_kept": True}
    assert run_label("snapkv", options) == "snapkv_merge_variance_route_fit"
    check_run(["snapkv", "pyramidkv"], [64], options, config)
    with pytest.raises(ValueError, match="makes merged slots, not a state"):
        check_run(["snapkv"], [64], compression_options(parser.parse_args(["--summary", "merge", "--fit_kept"])),
                  config)
    # eviction: the summary's settings mean nothing
    assert compression_options(parser.parse_args(["--summary", "none", "--fit_kept"])) == {}


# -- training through the fit --------------------------------------------------------------------

TINY = {"context_length": 160, "query_length": 32, "max_capacity_prompt": 48, "state_budget": 0.5,
        "window_size": 8, "num_features": 8, "lr": 2e-2, "eval_every": 10}


def test_training_through_the_fit_lowers_the_loss_after_the_fit():
    model = tiny_model()
    with one_thread():
        features = train(model, random_prompt(192, batch=3, seed=1), random_prompt(192, batch=1, seed=2),
                         TrainingConfig(**TINY, steps=20, fit_kept=True))
    table = features.metadata["held_out"]
    assert list(table) == ["eviction", "fitted", "merge", "learned_init", "learned"]
    assert table["fitted"]["error"] < table["eviction"]["error"]  # fitted compaction helps the later queries too
    assert features.metadata["train_loss"][-1] < features.metadata["train_loss"][0]
    assert features.metadata["settings"]["fit_kept"] is True
    assert "learned + fit, trained" in format_table(features.metadata)
    assert "eviction + fit (fitted)" in format_table(features.metadata)


def test_the_gradient_reaches_the_map_through_the_fit(monkeypatch):
    """With the state's read at the window queries cut from the graph, the gradient changes: the fit,
    which reads the state there, passes gradient to the map."""
    import ntkkv.training as training

    model = tiny_model()
    config = TrainingConfig(**TINY, steps=0, fit_kept=True)
    captured = {}
    original = training.layer_objectives

    def keep(*args, **kwargs):
        captured["objectives"] = original(*args, **kwargs)
        return captured["objectives"]

    monkeypatch.setattr(training, "layer_objectives", keep)
    features = train(model, random_prompt(192, batch=2, seed=1), random_prompt(192, batch=1, seed=2), config)
    objectives = captured["objectives"]
    scaling = attention_modules(model)[0].scaling
    features.requires_grad_(True)

    def gradient():
        features.zero_grad(set_to_none=True)
        mean_loss(features, objectives, training.summary_plans(config, features.head_dim)["learned"].clusters,
                  scaling, backward=True)
        return features.key_bias.grad.clone()

    through = gradient()
    original_fitted = training.fitted_kept
    monkeypatch.setattr(training, "fitted_kept", lambda fit, log_mass=None, state_mean=None: original_fitted(
        fit, None if log_mass is None else log_mass.detach(), None if state_mean is None else state_mean.detach()))
    cut = gradient()
    assert through.abs().sum() > 0 and cut.abs().sum() > 0
    assert (through - cut).abs().sum() > 1e-3 * through.abs().sum()


def test_a_layer_without_clusters_is_left_as_plain_eviction():
    """PyramidKV's top layer with too small a share for a cluster: no state, and fit_kept does not fit it
    either (the plan says the layer evicts plainly)."""
    keys, values, kept, bias, evicted, reference = random_case(7)
    summary = Taylor(order=1, fit_kept=True)
    slot_values, slot_bias = summary.refit(keys, values, kept, bias, evicted, reference, SCALING, 0, state=None)
    assert torch.equal(slot_values, gather(values, kept)) and torch.equal(slot_bias, bias)
    model = tiny_model()
    layers = model.config.num_hidden_layers
    budgets = [64] * (layers - 1) + [12]  # the top layer's tenth (1.2 tokens) holds no cluster (1.5)
    options = dict(max_capacity_prompt=budgets, summary="merge_variance", state_budget=0.1)
    with ntkkv.compress(model, "snapkv", **options, fit_kept=True):
        fitted = ntkkv.generate(model, random_prompt(150), max_new_tokens=1)
    with ntkkv.compress(model, "snapkv", **options):
        unfitted = ntkkv.generate(model, random_prompt(150), max_new_tokens=1)
    assert fitted.kv_kept == unfitted.kv_kept
    # the hidden states differ from the first layer on, so compare the biases: a token's is 0 unless fitted
    assert torch.equal(fitted.cache.layers[-1].bias, torch.zeros_like(fitted.cache.layers[-1].bias))
    assert torch.equal(unfitted.cache.layers[0].bias, torch.zeros_like(unfitted.cache.layers[0].bias))
    assert (fitted.cache.layers[0].bias != 0).any()  # the layers with a state are fitted


def test_training_computes_what_inference_computes():
    """The training objective's fitted slots beside a learned state (`fit_terms_of`, `fitted_kept`) give the
    later queries the output of the slots `Learned(fit_kept=True).refit` makes at inference."""
    from ntkkv.compressor import evicted_mask
    from ntkkv.policies import SelectionInputs, SnapKV
    from ntkkv.summaries.cluster_state import ClusterState
    from ntkkv.training import LayerCalibration, fit_terms_of, fitted_kept

    generator = torch.Generator().manual_seed(0)
    samples, kv_heads, group, n, later_count, d, window = 2, 2, 3, 60, 10, 8, 4
    keys, values = 2 * torch.randn(samples, kv_heads, n, d, generator=generator), \
        torch.randn(samples, kv_heads, n, d, generator=generator)
    queries = 2 * torch.randn(samples, kv_heads, group, n, d, generator=generator)
    later = 2 * torch.randn(samples, kv_heads, group * later_count, d, generator=generator)
    scaling = d**-0.5
    valid = torch.ones(samples, n, dtype=torch.bool)
    kept = SnapKV(20, window_size=window).select(SelectionInputs(queries, keys, values, valid, scaling), 0, 20)
    window_queries = queries[:, :, :, n - window:].reshape(samples, kv_heads, -1, d)
    summary = Learned(features=LearnedFeatures(1, kv_heads, d, 4, init="random", seed=1), fit_kept=True)
    evicted = evicted_mask(kept, valid)
    state = ClusterState(summary.features, 0).build(keys, values, summary.cluster(keys, evicted, 5), 5)
    slot_values, slot_bias = summary.refit(keys, values, kept, torch.zeros(kept.shape), evicted, window_queries,
                                           scaling, 0, state=state)
    assert (slot_bias != 0).any()
    layer = LayerCalibration(keys, values, later, None, {20: kept}, window_queries)
    lse, output = fitted_kept(fit_terms_of(layer, kept, scaling), *state.read(window_queries, scaling))
    logits = (later @ gather(keys, kept).transpose(-1, -2)) * scaling + slot_bias[:, :, None]
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1))
    torch.testing.assert_close(output, logits.softmax(dim=-1) @ slot_values)
