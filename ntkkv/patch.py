"""Patching a model: `compress(model, ...)` for one model, `replace_llama/mistral/qwen2` globally.

Both take a policy object or the original harness's string form, parsed into objects here and
nowhere else:

    compress(model, SnapKV(128, window_size=32), summary=Merge(0.125), ratchet=64)
    compress(model, "snapkv", max_capacity_prompt=128, window_size=32, summary="merge",
             state_budget=0.125, ratchet=64)
"""

from __future__ import annotations

from contextlib import contextmanager

from .compressor import Compressor
from .forward import compressed_attention_forward, patched
from .models import check_attn_implementation, check_supported, model_shape
from .plan import check_compression
from .policies import Policy, build_policy
from .summaries import build_summary

POLICY_OPTIONS = ("window_size", "kernel_size", "pooling", "gqa_reduce", "max_capacity_prompt_ratio", "beta",
                  "query_block", "sinks", "alpha_safeguard", "head_scores", "head_beta", "chunk_size")
SUMMARY_OPTIONS = ("state_budget", "cluster_by", "rank", "summary_path", "route", "spike_threshold", "concentration",
                   "fit_kept")
# the names these options had before summaries were called summaries; still accepted
OPTION_ALIASES = {"kernel": "summary", "kernel_path": "summary_path"}
DEFAULT_BUDGET = 2048


def build_compressor(method: str | Policy | None = "snapkv", max_capacity_prompt=None, *, summary=None,
                     ratchet=None, **options) -> Compressor | None:
    """The `Compressor` for a policy (an object, or a method name with its options) and a summary
    (an object, or a name with `state_budget`, `cluster_by`, `rank`, `summary_path`, `route`, `spike_threshold`,
    `concentration`, `fit_kept`); None for fullkv.

    Every bad value raises a ValueError naming it and what is allowed.
    """
    for old, new in OPTION_ALIASES.items():
        if old in options:
            value = options.pop(old)
            given = summary if new == "summary" else options.get(new)
            if given is not None and value is not None and given != value:
                raise ValueError(f"{old}={value!r} and {new}={given!r} name the same option; give one")
            if new == "summary":
                summary = value if summary is None else summary
            elif value is not None:
                options[new] = value
    unknown = sorted(set(options) - set(POLICY_OPTIONS) - set(SUMMARY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)}; the options are: max_capacity_prompt, summary, "
                         f"ratchet, {', '.join(POLICY_OPTIONS + SUMMARY_OPTIONS)}")
    policy_options = {name: options[name] for name in POLICY_OPTIONS if options.get(name) is not None}
    summary_options = {name: options.get(name) for name in SUMMARY_OPTIONS}
    if isinstance(method, Policy):
        if policy_options or max_capacity_prompt is not None:
            raise ValueError(f"set {', '.join(sorted(policy_options) or ['max_capacity_prompt'])} on the policy object")
        policy = method
    else:
        if max_capacity_prompt is None and policy_options.get("max_capacity_prompt_ratio") is None:
            max_capacity_prompt = DEFAULT_BUDGET
        policy = build_policy("fullkv" if method is None else method, max_capacity_prompt, **policy_options)
    summary = build_summary(summary, **summary_options)
    if ratchet is not None and (not isinstance(ratchet, int) or isinstance(ratchet, bool) or ratchet < 1):
        raise ValueError(f"ratchet must be a number of generated tokens ≥ 1 kept exact, or None, got {ratchet!r}")
    if policy is None:
        check_compression(None, summary, None)
        return None
    return Compressor(policy, summary, ratchet)


@contextmanager
def compress(model, method: str | Policy = "snapkv", max_capacity_prompt=None, *, summary=None, ratchet=None,
             **options):
    """Patch this model's attention for the duration of the block; leaving it restores the model.

    method: a policy object (`ntkkv.SnapKV(128)`), or one of ntkkv.METHODS (case-insensitive) with
        its options; "fullkv" leaves the model untouched.
    max_capacity_prompt: memory per layer and KV head in token equivalents (an int, or a list per
        layer; default 2048): exact K/V entries plus, with a summary, the summary of the evicted tokens.
    window_size, kernel_size, pooling, gqa_reduce: the policy's options (see `ntkkv.policies.Policy`);
        max_capacity_prompt_ratio: a share of each sample's prompt instead of max_capacity_prompt;
        alpha_safeguard (adakv, ada_pyramidkv, ada_kvzip, ada_pyramid_kvzip), head_scores and head_beta
        (headkv): the head-wise policies'.
    summary: what happens to evicted tokens: one of ntkkv.SUMMARIES ("none": dropped) or a summary
        object; state_budget (its share of the memory: a fraction < 1, or tokens; default 1/8),
        cluster_by ("kmeans" or "position"), rank (taylor2_lowrank's), summary_path (learned's file);
        route=True gives the evicted tokens holding much of the window's attention (share ≥
        spike_threshold / clusters, default 1) a cluster each and clusters only the rest, all clusters
        singletons where the top ones hold ≥ concentration (default 0.5) of it; same memory.
        fit_kept=True (a summary with a state, such as learned): the kept slots' bias and values are
        then fitted to the reference queries with the state in the sum (`ntkkv.summaries.fit`).
        `kernel=` and `kernel_path=` are accepted for summary and summary_path.
    ratchet: keep at most this many generated tokens exact; older ones fold into the summary
        (dropped without one), so memory stays flat. None: generated tokens all stay.
    """
    compressor = build_compressor(method, max_capacity_prompt, summary=summary, ratchet=ratchet, **options)
    if compressor is None:
        yield model
        return
    check_compression(compressor.policy, compressor.summary, model_shape(model))
    check_supported(model)
    check_attn_implementation(model.config._attn_implementation)
    with patched(model, compressor):
        yield model


def _replace_class(attention_class, method, max_capacity_prompt, options):
    if "_ntkkv_original_forward" not in vars(attention_class):
        attention_class._ntkkv_original_forward = attention_class.forward
    compressor = build_compressor(method, max_capacity_prompt, **options)
    if compressor is None:
        attention_class.forward = attention_class._ntkkv_original_forward
        attention_class.kv_compressor = None
        return
    attention_class.forward = compressed_attention_forward
    attention_class.kv_compressor = compressor


def replace_llama(method: str | Policy = "snapkv", max_capacity_prompt=None, **options) -> None:
    """The original harness's global switch: every LlamaAttention compresses with `method`
    (same arguments as `compress`); `replace_llama("fullkv")` restores the original forward."""
    from transformers.models.llama import modeling_llama

    _replace_class(modeling_llama.LlamaAttention, method, max_capacity_prompt, options)


def replace_mistral(method: str | Policy = "snapkv", max_capacity_prompt=None, **options) -> None:
    """As `replace_llama`, for MistralAttention."""
    from transformers.models.mistral import modeling_mistral

    _replace_class(modeling_mistral.MistralAttention, method, max_capacity_prompt, options)


def replace_qwen2(method: str | Policy = "snapkv", max_capacity_prompt=None, **options) -> None:
    """As `replace_llama`, for Qwen2Attention."""
    from transformers.models.qwen2 import modeling_qwen2

    _replace_class(modeling_qwen2.Qwen2Attention, method, max_capacity_prompt, options)
