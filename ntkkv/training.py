"""Training the learned ("NTK") feature map by distillation on the model's own attention.

Each calibration sequence is cut into a context (its first N tokens) and later queries (the
next M tokens). Per layer, the target is full softmax attention of the later queries over the
context keys; the approximation is what the patched attention computes at the same memory:
SnapKV keeps `plan.exact` context tokens exact, the others are clustered (k-means on the keys)
into a `ClusterState` read through the learned features (with `route`, the evicted tokens that
hold much of the observation window's attention get a cluster each, as at inference), and the two
parts are merged through the log-sum-exp. With `fit_kept`, the exact part is fitted compaction's
(`ntkkv.summaries.fit`): at every step the kept slots' bias and values are fitted to the observation
window's queries with the learned state in the sum, as `--fit_kept` does at inference, and the loss is
taken after the fit; the gradient runs through the closed-form fit into the map. The loss is the
relative squared error ‖o − o*‖² / ‖o*‖², averaged over queries, heads and layers; the parameters
are per layer, so one Adam step moves every layer.

Selection, clustering and the exact part do not depend on the features: they are computed once
(`collect_calibration`, `layer_objectives`) and a step only builds and reads the states (and, with
`fit_kept`, refits the kept slots).
"""

from __future__ import annotations

import contextvars
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .compressor import assemble, evicted_mask, gather_tokens
from .models import attention_modules, model_shape
from .ops import merge_attention, reference_attention
from .policies import SelectionInputs, SnapKV
from .summaries import ClusterSummary, LayerPlan, Learned, Merge
from .summaries.cluster_state import ClusterState
from .summaries.clusters import CLUSTER_BY, cluster_means
from .summaries.fit import DEFAULT_MIN_WEIGHT, DEFAULT_RIDGE, fit_terms, reference_terms
from .summaries.learned import INITS, LearnedFeatures
from .summaries.routing import DEFAULT_CONCENTRATION, DEFAULT_SPIKE_THRESHOLD

logger = logging.getLogger(__name__)

CAPTURE_IMPLEMENTATION = "ntkkv_capture"
# the relative error of a query whose target output is (numerically) zero is not defined
TARGET_NORM_FLOOR = 1e-12


# -- capturing the model's attention inputs ---------------------------------------------------

@dataclass
class Activations:
    """One layer's attention inputs for one sequence, after RoPE, float32 on the model's device.

    queries (1, heads, n, d); keys, values (1, kv_heads, n, d); scaling: the softmax scale.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float


_active_recorder: contextvars.ContextVar = contextvars.ContextVar("ntkkv_capture_recorder", default=None)


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    """sdpa, after handing the layer's (query, key, value) to the capture in progress."""
    record = _active_recorder.get()
    if record is not None:
        record(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def capture_attention(model, input_ids: torch.Tensor) -> list[Activations]:
    """Run the model once over `input_ids` (1, n) and return every layer's `Activations`.

    For the call, the model's attention implementation is switched to a registered one that
    records its inputs and then runs sdpa (with the masks sdpa gets); it is switched back after,
    so the model is left as it was.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture_attention takes one sequence, input_ids of shape (1, n); "
                         f"got {tuple(input_ids.shape)}")
    modules = attention_modules(model)
    if any("forward" in vars(module) for module in modules):
        raise RuntimeError("capture the attention of an unpatched model: leave the ntkkv.compress block first")
    # registering twice only rebinds the same name; it is a new name, so no model's default changes
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _recording_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    configs = {id(config): config for config in [model.config, *(module.config for module in modules)]}.values()
    previous = [(config, config._attn_implementation) for config in configs]
    captured: dict[int, Activations] = {}

    def record(module, query, key, value):
        captured[module.layer_idx] = Activations(query.float(), key.float(), value.float(), float(module.scaling))

    token = _active_recorder.set(record)
    try:
        for config, _ in previous:
            config._attn_implementation = CAPTURE_IMPLEMENTATION
        device = model.get_input_embeddings().weight.device
        model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=1)  # no logits over the sequence
    finally:
        for config, implementation in previous:
            config._attn_implementation = implementation
        _active_recorder.reset(token)
    if sorted(captured) != list(range(len(modules))):
        raise RuntimeError(f"captured layers {sorted(captured)} of {len(modules)}: the model did not dispatch "
                           f"its attention through config._attn_implementation")
    return [captured[layer] for layer in range(len(modules))]


# -- settings and memory plans ----------------------------------------------------------------

@dataclass
class TrainingConfig:
    """The settings of a training run (all recorded in the learned map file's metadata).

    context_length: N, the tokens of each calibration sequence that get compressed.
    query_length: M, the later tokens whose queries read the compressed context.
    max_capacity_prompt: memory per layer and KV head in token equivalents (as `ntkkv.compress`).
    state_budget: the share of it the clusters' states may use (as `ntkkv.compress`).
    window_size: SnapKV's observation window (the context's last tokens, always kept).
    num_features: F, features per layer and KV head.
    steps, lr: Adam steps (each over every training sequence and layer) and learning rate.
    weight_decay: AdamW's decoupled decay of the parameters towards 0 (0: plain Adam). The map
        overfits the few clusters a calibration set holds; decay keeps it smoother.
    eval_every: the held-aside loss is recorded every this many steps.
    cluster_by: "kmeans" or "position", as the summary does at inference.
    route, spike_threshold, concentration: route the evicted tokens as the summary does at inference
        with the same settings (`ntkkv.summaries.ClusterSummary`): the spikes get singleton clusters,
        the others hold only the diffuse tokens, for the learned states and the merged-slot reference.
    seed: of the random features the training starts from.
    init: "merge" (start at the merged slot: W ≈ 0, no damping; the default) or "random" (positive
        random features, which start far from softmax at these scales and overfit).
    fit_kept: train for `fit_kept=True` at inference: the loss is taken after the kept slots are fitted
        to the observation window's queries beside the learned state (the module's docstring).
    """

    context_length: int = 2048
    query_length: int = 256
    max_capacity_prompt: int = 128
    state_budget: float = 0.25
    window_size: int = 8
    num_features: int = 16
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 0.0
    eval_every: int = 25
    cluster_by: str = "kmeans"
    seed: int = 0
    init: str = "merge"
    route: bool = False
    spike_threshold: float = DEFAULT_SPIKE_THRESHOLD
    concentration: float = DEFAULT_CONCENTRATION
    fit_kept: bool = False

    def __post_init__(self):
        for name in ("context_length", "query_length", "max_capacity_prompt", "window_size", "num_features",
                     "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be an integer ≥ 0, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.weight_decay, (int, float)) or isinstance(self.weight_decay, bool) \
                or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be a number ≥ 0, got {self.weight_decay!r}")
        if self.max_capacity_prompt <= self.window_size:
            raise ValueError(f"max_capacity_prompt must be larger than window_size={self.window_size}, "
                             f"got {self.max_capacity_prompt}")
        if self.context_length <= self.max_capacity_prompt:
            raise ValueError(f"context_length must be larger than max_capacity_prompt={self.max_capacity_prompt} "
                             f"(else nothing is evicted), got {self.context_length}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of: {', '.join(INITS)}")
        if self.cluster_by not in CLUSTER_BY:
            raise ValueError(f"unknown cluster_by {self.cluster_by!r}; choose one of: {', '.join(CLUSTER_BY)}")
        if not isinstance(self.fit_kept, bool):
            raise ValueError(f"fit_kept must be True or False, got {self.fit_kept!r}")
        clustering_summary(self)  # checks state_budget and the routing settings, naming the bad value

    @property
    def sequence_length(self) -> int:
        return self.context_length + self.query_length


def clustering_summary(config: TrainingConfig) -> Merge:
    """The merged-slot summary of these settings; its clustering (`cluster`: cluster_by and routing) is
    the learned states' too."""
    return Merge(config.state_budget, config.cluster_by, route=config.route, spike_threshold=config.spike_threshold,
                 concentration=config.concentration)


def summary_plans(config: TrainingConfig, head_dim: int) -> dict[str, LayerPlan]:
    """The memory plans compared at one budget: eviction alone, merged slots, learned states."""
    features = LearnedFeatures(1, 1, head_dim, config.num_features)  # the plan depends on F and d only
    plans = {
        "eviction": LayerPlan(config.max_capacity_prompt, config.max_capacity_prompt),
        "merge": Merge(config.state_budget, config.cluster_by).plan(config.max_capacity_prompt, head_dim),
        "learned": Learned(config.state_budget, config.cluster_by, features=features)
        .plan(config.max_capacity_prompt, head_dim),
    }
    for name, plan in plans.items():
        if plan.exact <= config.window_size:
            raise ValueError(f"summary {name!r}: a budget of {config.max_capacity_prompt} with a state of "
                             f"{plan.summary_tokens:.1f} tokens leaves {plan.exact} exact tokens, not more than "
                             f"window_size={config.window_size}")
    return plans


# -- calibration data -------------------------------------------------------------------------

@dataclass
class LayerCalibration:
    """One layer's data, sequences stacked on the batch dimension (S).

    keys, values: (S, kv_heads, N, d) of the context; queries: (S, kv_heads, group·M, d), the
    later queries with the heads of a KV head's group stacked; target: their full attention
    over the context; kept: for each number of exact tokens, SnapKV's indices (S, kv_heads, kept);
    window_queries: (S, kv_heads, group·window, d), the context's observation window, which the
    summary receives at a prefill of the context (routing reads it).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    target: torch.Tensor
    kept: dict[int, torch.Tensor]
    window_queries: torch.Tensor


@dataclass
class Calibration:
    layers: list[LayerCalibration]
    scaling: float


def _layer_calibration(activations: Activations, context_length: int, method: SnapKV, kept_counts,
                       layer_idx: int) -> LayerCalibration:
    queries, keys, values = activations.queries, activations.keys, activations.values
    _, heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    context_keys, context_values = keys[:, :, :context_length], values[:, :, :context_length]
    later = queries[:, :, context_length:].reshape(1, kv_heads, group * (n - context_length), head_dim)
    _, target = reference_attention(later, context_keys, context_values, 0.0, activations.scaling)
    # the selection sees the context alone, as a prefill of the context would
    grouped = queries[:, :, :context_length].reshape(1, kv_heads, group, context_length, head_dim)
    valid = torch.ones(1, context_length, dtype=torch.bool, device=keys.device)
    inputs = SelectionInputs(grouped, context_keys, context_values, valid, activations.scaling)
    kept = {count: method.for_exact(count).select(inputs, layer_idx, count) for count in kept_counts}
    window = min(method.window_size, context_length)
    window_queries = grouped[:, :, :, context_length - window:].reshape(1, kv_heads, -1, head_dim)
    return LayerCalibration(context_keys.contiguous(), context_values.contiguous(), later, target, kept,
                            window_queries)


@torch.no_grad()
def collect_calibration(model, input_ids: torch.Tensor, context_length: int, method: SnapKV,
                        kept_counts: Sequence[int], progress: Callable[[int], None] | None = None) -> Calibration:
    """Capture each sequence of `input_ids` (S, N + M) and keep, per layer, what the objective needs."""
    parts: list[list[LayerCalibration]] = []
    scaling = None
    for index, sequence in enumerate(input_ids):
        activations = capture_attention(model, sequence[None])
        scaling = activations[0].scaling
        if not parts:
            parts = [[] for _ in activations]
        for layer, layer_activations in enumerate(activations):
            parts[layer].append(_layer_calibration(layer_activations, context_length, method, kept_counts, layer))
        del activations
        if progress is not None:
            progress(index + 1)
    layers = [LayerCalibration(*(torch.cat([getattr(part, name) for part in layer_parts])
                                 for name in ("keys", "values", "queries", "target")),
                               {count: torch.cat([part.kept[count] for part in layer_parts]) for count in kept_counts},
                               torch.cat([part.window_queries for part in layer_parts]))
              for layer_parts in parts]
    return Calibration(layers, scaling)


def calibration_ids(tokenizer, texts: Sequence[str], sequence_length: int, sequences: int,
                    held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (sequences, L) for training and (held_out, L) held aside, cut from `texts`
    (essays): the held-aside ones from the last texts, the training ones from the others, so
    that no text feeds both. Within a split the texts run on, one after the other."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    held_texts = 0
    while held_texts < len(texts) and sum(map(len, encoded[len(texts) - held_texts:])) < held_out * sequence_length:
        held_texts += 1
    held_stream = [token for ids in encoded[len(texts) - held_texts:] for token in ids]
    train_stream = [token for ids in encoded[: len(texts) - held_texts] for token in ids]
    needed = (sequences * sequence_length, held_out * sequence_length)
    if len(held_stream) < needed[1] or len(train_stream) < needed[0]:
        raise ValueError(f"the texts hold {sum(map(len, encoded))} tokens in {len(texts)} texts; {sequences} training "
                         f"and {held_out} held-aside sequences of {sequence_length} tokens from different texts need "
                         f"{needed[0]} + {needed[1]}: fewer or shorter sequences, or more text")

    def cut(stream, count):
        return torch.tensor(stream[: count * sequence_length], dtype=torch.long).view(count, sequence_length)

    return cut(train_stream, sequences), cut(held_stream, held_out)


# -- the objective ----------------------------------------------------------------------------

@dataclass
class LayerObjective:
    """What one layer's loss needs that the features do not change.

    keys, values, queries, target: as in `LayerCalibration`; assignment (S, kv_heads, N): the
    cluster of each evicted context token, -1 for the kept; kept_lse, kept_output: exact
    attention of the queries over the kept tokens. For fit_kept, `fit` holds what the fit needs
    that the features do not change (`FitTerms`), else None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    target: torch.Tensor
    assignment: torch.Tensor
    kept_lse: torch.Tensor
    kept_output: torch.Tensor
    fit: FitTerms | None = None


@dataclass
class FitTerms:
    """One layer's fit of the kept slots (`ntkkv.summaries.fit.fit_terms`): the observation window's
    queries (S, kv_heads, group·window, d) and, per window query, its logits at the kept slots, the
    log-sum-exp over the context and full attention's output; the kept slots' values (S, kv_heads, k, d);
    the later queries' logits at the kept slots (S, kv_heads, group·M, k)."""

    window_queries: torch.Tensor
    at_kept: torch.Tensor
    log_total: torch.Tensor
    targets: torch.Tensor
    kept_values: torch.Tensor
    later_logits: torch.Tensor


@torch.no_grad()
def layer_objectives(calibration: Calibration, plan: LayerPlan, clustering: ClusterSummary,
                     fit_kept: bool = False) -> list[LayerObjective]:
    """Per layer, what the loss needs; the evicted tokens clustered as `clustering.cluster` does at inference.
    fit_kept: also what the fit of the kept slots needs (`FitTerms`)."""
    objectives = []
    scaling = calibration.scaling
    for layer in calibration.layers:
        kept = layer.kept[plan.exact]
        valid = all_valid(layer.keys)
        evicted = evicted_mask(kept, valid)
        assignment = clustering.cluster(layer.keys, evicted, plan.clusters, layer.window_queries, scaling)
        kept_keys, kept_values = gather_tokens(layer.keys, kept), gather_tokens(layer.values, kept)
        lse, output = reference_attention(layer.queries, kept_keys, kept_values, 0.0, scaling)
        fit = fit_terms_of(layer, kept, scaling) if fit_kept else None
        objectives.append(LayerObjective(layer.keys, layer.values, layer.queries, layer.target, assignment, lse,
                                         output, fit))
    return objectives


@torch.no_grad()
def fit_terms_of(layer: LayerCalibration, kept: torch.Tensor, scaling: float) -> FitTerms:
    """The `FitTerms` of one layer whose kept tokens are `kept` (S, kv_heads, k)."""
    real = torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
    at_kept, log_total, targets = reference_terms(layer.window_queries, layer.keys, layer.values, real, kept, scaling)
    return FitTerms(layer.window_queries, at_kept, log_total, targets, gather_tokens(layer.values, kept).float(),
                    (layer.queries.float() @ gather_tokens(layer.keys, kept).float().transpose(-1, -2)) * scaling)


def fitted_kept(fit: FitTerms, log_mass=None, state_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The later queries' log-sum-exp and output over the kept slots fitted (`fit_terms`) beside a state that
    gives the window queries log_mass and state_mean (None: no state, plain fitted compaction). Every
    calibration sequence evicts (its context is longer than the budget)."""
    live = torch.ones(fit.kept_values.shape[:3], dtype=torch.bool, device=fit.kept_values.device)
    values, log_weights, _ = fit_terms(fit.at_kept, fit.log_total, fit.targets, fit.kept_values, live,
                                       live[..., 0], DEFAULT_RIDGE, DEFAULT_MIN_WEIGHT, log_mass, state_mean)
    logits = fit.later_logits + log_weights[:, :, None]
    return logits.logsumexp(dim=-1), torch.softmax(logits, dim=-1) @ values


def learned_output(features: LearnedFeatures, layer_idx: int, objective: LayerObjective, clusters: int,
                   scaling: float) -> torch.Tensor:
    """The merged output (S, kv_heads, group·M, d) of the kept tokens and the learned states; with the
    objective's `fit`, of the kept slots fitted beside the states."""
    state = ClusterState(features, layer_idx).build(objective.keys, objective.values, objective.assignment, clusters)
    log_mass, state_mean = state.read(objective.queries, scaling)
    if objective.fit is None:
        return merge_attention(objective.kept_lse, objective.kept_output, log_mass, state_mean)
    kept_lse, kept_output = fitted_kept(objective.fit, *state.read(objective.fit.window_queries, scaling))
    return merge_attention(kept_lse, kept_output, log_mass, state_mean)


def relative_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖o − o*‖² / ‖o*‖² per query: (..., d) -> (...)."""
    return (output - target).square().sum(dim=-1) / target.square().sum(dim=-1).clamp_min(TARGET_NORM_FLOOR)


@torch.no_grad()
def balancing_scale(objectives: list[LayerObjective], scaling: float) -> torch.Tensor:
    """c (layers, kv_heads) with c² = mean‖δ‖ / mean‖s·q‖: the positive random features'
    variance is least when both sides of exp(x·δ) = exp((c·x)·(δ/c)) have the same size."""
    scales = []
    for objective in objectives:
        clusters = int(objective.assignment.max()) + 1
        means, _ = cluster_means(objective.keys, objective.assignment, clusters)
        own_mean = gather_tokens(means, objective.assignment.clamp_min(0))
        evicted = (objective.assignment >= 0).float()
        delta_norm = ((objective.keys - own_mean).norm(dim=-1) * evicted).sum(dim=(0, 2)) / evicted.sum(dim=(0, 2))
        query_norm = (scaling * objective.queries).norm(dim=-1).mean(dim=(0, 2))
        scales.append((delta_norm / query_norm).sqrt())
    return torch.stack(scales).cpu()


# -- held-aside evaluation --------------------------------------------------------------------

def all_valid(keys: torch.Tensor) -> torch.Tensor:
    """(S, n) True: calibration sequences have no padding."""
    return torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)


@torch.no_grad()
def merge_output(summary: Merge, plan: LayerPlan, layer: LayerCalibration, layer_idx: int,
                 scaling: float) -> torch.Tensor:
    """The output over the kept tokens and the merged slots, as the patched attention holds them."""
    kept = layer.kept[plan.exact]
    summarised = summary.summarise(layer.keys, layer.values, evicted_mask(kept, all_valid(layer.keys)), plan,
                                   layer_idx, layer.window_queries, scaling)
    keys, values, bias, _ = assemble(layer.keys, layer.values, kept, torch.zeros(kept.shape, device=kept.device),
                                     summarised)
    return reference_attention(layer.queries, keys, values, bias[:, :, None, :], scaling)[1]


@torch.no_grad()
def held_out_table(calibration: Calibration, plans: dict[str, LayerPlan], learned: dict[str, LearnedFeatures],
                   config: TrainingConfig) -> dict[str, dict]:
    """Per approximation: the relative L2 error ‖o − o*‖/‖o*‖ ("error") and squared error ("loss"),
    averaged over queries, heads and sequences per layer ("error_per_layer") and over layers."""
    merge = clustering_summary(config)
    objectives = layer_objectives(calibration, plans["learned"], merge, config.fit_kept)
    scaling = calibration.scaling

    def output(name: str, layer_idx: int, layer: LayerCalibration) -> torch.Tensor:
        if name == "eviction":
            kept = layer.kept[plans["eviction"].exact]
            return reference_attention(layer.queries, gather_tokens(layer.keys, kept),
                                       gather_tokens(layer.values, kept), 0.0, scaling)[1]
        if name == "fitted":
            return fitted_kept(fit_terms_of(layer, layer.kept[plans["eviction"].exact], scaling))[1]
        if name == "merge":
            return merge_output(merge, plans["merge"], layer, layer_idx, scaling)
        return learned_output(learned[name], layer_idx, objectives[layer_idx], plans["learned"].clusters, scaling)

    table = {}
    for name in ["eviction", *(["fitted"] if config.fit_kept else []), "merge", *learned]:
        squared = [relative_squared_error(output(name, i, layer), layer.target)
                   for i, layer in enumerate(calibration.layers)]
        errors = [float(error.sqrt().mean()) for error in squared]
        table[name] = {"error": sum(errors) / len(errors), "loss": sum(float(e.mean()) for e in squared) / len(squared),
                       "error_per_layer": errors}
    return table


# -- training ---------------------------------------------------------------------------------

def mean_loss(features: LearnedFeatures, objectives: list[LayerObjective], clusters: int, scaling: float,
              backward: bool = False) -> float:
    """The loss averaged over layers; with `backward`, its gradient accumulates one layer at a
    time (the parameters are per layer), so only one layer's graph is alive at once."""
    total = 0.0
    for layer_idx, objective in enumerate(objectives):
        output = learned_output(features, layer_idx, objective, clusters, scaling)
        loss = relative_squared_error(output, objective.target).mean() / len(objectives)
        if backward:
            loss.backward()
        total += float(loss.detach())  # a float: with device_map="auto" layers may sit on different devices
    return total


def _capture_logger(split: str, total: int) -> Callable[[int], None]:
    return lambda done: logger.info("captured %s sequence %d/%d", split, done, total)


def train(model, train_ids: torch.Tensor, held_out_ids: torch.Tensor, config: TrainingConfig | None = None,
          on_step: Callable[[int, float, float | None], None] | None = None) -> LearnedFeatures:
    """Fit `LearnedFeatures` for `model` on `train_ids` (S, ≥ N + M) and evaluate on `held_out_ids`.

    on_step(step, train_loss, held_out_loss or None) is called after each step (the losses are
    those before the step's update). The returned features' `metadata` holds the settings, the
    plans, the curves and the held-aside table (plain Python types).
    """
    config = config or TrainingConfig()
    num_layers, kv_heads, head_dim = model_shape(model)
    for name, ids in (("train_ids", train_ids), ("held_out_ids", held_out_ids)):
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < config.sequence_length:
            raise ValueError(f"{name} must be (sequences ≥ 1, ≥ {config.sequence_length} tokens): context_length "
                             f"{config.context_length} + query_length {config.query_length}; got {tuple(ids.shape)}")
    max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_positions is not None and config.sequence_length > max_positions:
        raise ValueError(f"context_length + query_length = {config.sequence_length} exceeds the model's "
                         f"max_position_embeddings {max_positions}")
    plans = summary_plans(config, head_dim)
    method = SnapKV(max_capacity_prompt=config.max_capacity_prompt, window_size=config.window_size)
    kept_counts = sorted({plan.exact for plan in plans.values()})
    started = time.perf_counter()
    calibrations = {}
    for split, ids in (("train", train_ids), ("held_out", held_out_ids)):
        calibrations[split] = collect_calibration(model, ids[:, : config.sequence_length], config.context_length,
                                                  method, kept_counts, progress=_capture_logger(split, len(ids)))
    scaling = calibrations["train"].scaling
    clusters = plans["learned"].clusters
    objectives = {split: layer_objectives(calibration, plans["learned"], clustering_summary(config), config.fit_kept)
                  for split, calibration in calibrations.items()}
    scale = balancing_scale(objectives["train"], scaling)
    device = calibrations["train"].layers[0].keys.device
    features = LearnedFeatures(num_layers, kv_heads, head_dim, config.num_features, scale=scale,
                               seed=config.seed, init=config.init).to(device)
    initial = copy.deepcopy(features)
    logger.info("plans at budget %d: %s", config.max_capacity_prompt, plans)

    optimiser = torch.optim.AdamW(features.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_curve, held_steps, held_curve = [], [], []
    for step in range(config.steps + 1):
        held_loss = None
        if step % config.eval_every == 0 or step == config.steps:
            with torch.no_grad():
                held_loss = mean_loss(features, objectives["held_out"], clusters, scaling)
            held_steps.append(step)
            held_curve.append(held_loss)
            logger.info("step %d: held-aside loss %.4g", step, held_loss)
        if step == config.steps:  # the last held-aside point is after the last update
            break
        optimiser.zero_grad(set_to_none=True)
        train_loss = mean_loss(features, objectives["train"], clusters, scaling, backward=True)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"the training loss is {train_loss} at step {step}: lower lr (now {config.lr})")
        optimiser.step()
        train_curve.append(train_loss)
        if on_step is not None:
            on_step(step, train_loss, held_loss)
    seconds = time.perf_counter() - started

    table = held_out_table(calibrations["held_out"], plans, {"learned_init": initial, "learned": features}, config)
    features.metadata = {
        "settings": asdict(config),
        "model": {"name_or_path": str(getattr(model.config, "name_or_path", "")), "num_layers": num_layers,
                  "kv_heads": kv_heads, "head_dim": head_dim, "scaling": scaling},
        "data": {"train_sequences": int(train_ids.shape[0]), "held_out_sequences": int(held_out_ids.shape[0])},
        "plans": {name: asdict(plan) for name, plan in plans.items()},
        "scale": scale.tolist(),
        "train_loss": train_curve,
        "held_out_loss": {"steps": held_steps, "loss": held_curve},
        "held_out": table,
        "seconds": seconds,
    }
    return features


# -- reporting --------------------------------------------------------------------------------

TABLE_ROWS = {"eviction": "eviction only (SnapKV)", "fitted": "eviction + fit (fitted)",
              "merge": "merged slots (merge)", "learned_init": "learned, at its init", "learned": "learned, trained"}
FIT_ROWS = {"learned_init": "learned + fit, at its init", "learned": "learned + fit, trained"}
COLOURS = {"eviction": "tab:red", "fitted": "tab:orange", "merge": "tab:green", "learned_init": "tab:gray",
           "learned": "tab:blue"}


def row_label(metadata: dict, name: str) -> str:
    rows = {**TABLE_ROWS, **FIT_ROWS} if metadata["settings"].get("fit_kept") else TABLE_ROWS
    return rows.get(name, name)


def format_table(metadata: dict) -> str:
    """The held-aside table as Markdown."""
    lines = ["| summary | exact tokens | state tokens | rel. L2 error | rel. squared error |",
             "|---|---:|---:|---:|---:|"]
    for name, row in metadata["held_out"].items():
        plan = metadata["plans"]["learned" if name.startswith("learned") else "eviction" if name == "fitted" else name]
        # files written before the rename record "kept" and "state_tokens"
        exact, tokens = plan.get("exact", plan.get("kept")), plan.get("summary_tokens", plan.get("state_tokens"))
        lines.append(f"| {row_label(metadata, name)} | {exact} | {tokens:.1f} | "
                     f"{row['error']:.4f} | {row['loss']:.4f} |")
    return "\n".join(lines)


def plot_curves(metadata: dict, path) -> None:
    """Two panels to PNG: the loss curves (train per step, held-aside every `eval_every`, with
    eviction's and merged slots' held-aside loss as references) and the held-aside error per layer."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    curves, layers = fig.subplots(1, 2)
    train_curve, held = metadata["train_loss"], metadata["held_out_loss"]
    curves.plot(range(len(train_curve)), train_curve, label="learned, train", color=COLOURS["learned"], alpha=0.6)
    curves.plot(held["steps"], held["loss"], "o-", label="learned, held aside", color=COLOURS["learned"])
    for name in ("eviction", "fitted", "merge"):
        if name in metadata["held_out"]:
            curves.axhline(metadata["held_out"][name]["loss"], linestyle="--", color=COLOURS[name],
                           label=f"{TABLE_ROWS[name]}, held aside")
    curves.set(yscale="log", xlabel="step", ylabel="‖o − o*‖² / ‖o*‖² (mean over layers)", title="loss")
    curves.legend()
    for name, row in metadata["held_out"].items():
        layers.plot(row["error_per_layer"], marker=".", label=row_label(metadata, name), color=COLOURS.get(name))
    layers.set(yscale="log", xlabel="layer", ylabel="‖o − o*‖ / ‖o*‖", title="held-aside error per layer")
    layers.xaxis.get_major_locator().set_params(integer=True)
    layers.legend()
    settings = metadata["settings"]
    fig.suptitle(f"{metadata['model']['name_or_path'] or 'model'}: budget {settings['max_capacity_prompt']}, "
                 f"state {settings['state_budget']}, F={settings['num_features']}, "
                 f"N={settings['context_length']}, M={settings['query_length']}"
                 + (", routed" if settings.get("route") else "")
                 + (", kept slots fitted" if settings.get("fit_kept") else ""))
    fig.savefig(path, dpi=120)
