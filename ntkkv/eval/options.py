"""Command-line flags for the compression parameters, shared by the runners, and the check of a
run's settings against the model's config before any weights load."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import torch

from ntkkv.eval.batching import batch_size_setting
from ntkkv.eval.jsonl import BAD_LINE_POLICIES
from ntkkv.eval.longbench_run import GenerationSettings
from ntkkv.generation import DECODE_MODES
from ntkkv.models import ATTN_IMPLEMENTATIONS, load_config, model_shape
from ntkkv.patch import OPTION_ALIASES, build_compressor
from ntkkv.plan import check_compression
from ntkkv.policies import METHODS, canonical_name
from ntkkv.summaries import SUMMARIES, canonical_summary, refits_kept

SELECTION_FLAGS = ("window_size", "kernel_size", "pooling", "gqa_reduce", "alpha_safeguard", "head_scores", "head_beta")
# the ratchet last: it stays when the summary is none (compression_options)
SUMMARY_FLAGS = ("summary", "state_budget", "cluster_by", "rank", "summary_path", "route", "spike_threshold",
                 "concentration", "fit_kept", "ratchet")


def add_compression_arguments(parser) -> None:
    group = parser.add_argument_group("compression (defaults: the original harness's)")
    group.add_argument("--window_size", type=int, default=None,
                       help="last tokens always kept, SnapKV's observation window (default 8; StreamingLLM budget-4)")
    group.add_argument("--kernel_size", type=int, default=None,
                       help="pooling width of the scores (default 7; the kvzip methods 1: not pooled)")
    group.add_argument("--pooling", default=None, help="avgpool or maxpool (default maxpool)")
    group.add_argument("--gqa_reduce", default=None, help="mean or max over a KV head's query heads (default mean)")
    group.add_argument("--alpha_safeguard", "--floor", dest="alpha_safeguard", type=float, default=None,
                       help="adakv, ada_pyramidkv, ada_kvzip, ada_pyramid_kvzip: share of the even per-head budget "
                            "every head keeps (default 0.2)")
    group.add_argument("--head_scores", "--head_path", dest="head_scores", default=None,
                       help="headkv: head-scores file from compute_head_scores.py (default: SmolLM2's, shipped)")
    group.add_argument("--head_beta", type=float, default=None,
                       help="headkv: the budget's share pooled by importance is 1/head_beta (default 1.01)")
    summaries = parser.add_argument_group("evicted tokens (the budget counts their summary: equal memory)")
    summaries.add_argument("--summary", "--kernel", dest="summary", default=None,
                           help=f"what happens to evicted tokens: {', '.join(SUMMARIES)} (default none: dropped)")
    summaries.add_argument("--state_budget", type=float, default=None,
                           help="share of the budget the summary may use: a fraction < 1 or tokens (default 0.125)")
    summaries.add_argument("--cluster_by", default=None, help="kmeans (default) or position")
    summaries.add_argument("--rank", type=int, default=None, help="taylor2_lowrank's rank (default 4)")
    summaries.add_argument("--summary_path", "--kernel_path", dest="summary_path", default=None,
                           help="the file of a learned map (train_learned_map.py), for --summary learned")
    summaries.add_argument("--route", action="store_true", default=None,
                           help="cluster summaries: evicted tokens holding much of the window's attention get a "
                                "cluster each, the other clusters summarise the diffuse rest (same memory)")
    summaries.add_argument("--spike_threshold", type=float, default=None,
                           help="with --route: a token is a spike from this multiple of an average cluster's share "
                                "of the evicted attention (default 1.0)")
    summaries.add_argument("--concentration", type=float, default=None,
                           help="with --route: where the top tokens hold this share of it, every cluster is a token "
                                "(default 0.5)")
    summaries.add_argument("--fit_kept", action="store_true", default=None,
                           help="summaries with a state (learned, taylor*, merge_variance): then fit the kept slots' "
                                "bias and values to the window's (or KVzip's reconstruction) queries with the state "
                                "in the sum, as --summary fitted does for eviction (same memory)")
    summaries.add_argument("--ratchet", type=int, default=None,
                           help="keep at most this many generated tokens exact; older ones fold into the summary "
                                "(dropped without one), so memory stays flat (default off)")


def add_budget_argument(parser, default, help_text, nargs=None) -> None:
    """The budget flag in both spellings of the original scripts (LongBench's plural, the needle's singular)."""
    parser.add_argument("--max_capacity_prompts", "--max_capacity_prompt", dest="max_capacity_prompts", type=int,
                        default=default, nargs=nargs, help=help_text)


def compression_options(args) -> dict:
    """The flags given, as keyword arguments of ntkkv.compress (unset ones left to its defaults)."""
    options = {name: getattr(args, name) for name in SELECTION_FLAGS + SUMMARY_FLAGS
               if getattr(args, name, None) is not None}
    if options.get("summary") is not None and canonical_summary(options["summary"]) == "none":
        for name in SUMMARY_FLAGS[:-1]:  # eviction: the summary's settings mean nothing (the ratchet stays)
            options.pop(name, None)
    return options


def recorded_options(options: dict) -> dict:
    """Options as a results file records them (JSON types), with the names of before the rename
    (kernel, kernel_path, ratchetkv) read as today's, so that old cells still match."""
    recorded = {}
    for name, value in options.items():
        name = OPTION_ALIASES.get(name, name)
        if name == "summary" and isinstance(value, str):
            value = canonical_summary(value)
        recorded[name] = value if isinstance(value, (int, float, str, bool)) or value is None else repr(value)
    return recorded


def run_label(method: str, options: dict) -> str:
    """The name a run's results go under: the method with the head-wise options given, and the summary with
    its settings if any ("snapkv", "snapkv_merge", "pyramidkv_taylor2_lowrank_sb0.25_r8", "adakv_a0.1",
    "headkv_llama3_scores", "snapkv_merge_route_st2"), so runs never mix on resume."""
    options = recorded_options(options)
    parts = [method]
    for flag, short in (("alpha_safeguard", "a"), ("head_beta", "hb")):
        if options.get(flag) is not None:
            parts.append(f"{short}{options[flag]:g}")
    if options.get("head_scores"):
        parts.append(Path(options["head_scores"]).stem)
    summary = options.get("summary")
    if summary is None or summary == "none":
        return "_".join(parts)
    parts.append(summary)
    for flag, short in (("state_budget", "sb"), ("cluster_by", "by"), ("rank", "r"), ("ratchet", "ratchet")):
        if options.get(flag) is not None:
            parts.append(f"{short}{options[flag]:g}" if isinstance(options[flag], float) else f"{short}{options[flag]}")
    if options.get("route"):
        parts.append("route")
        for flag, short in (("spike_threshold", "st"), ("concentration", "conc")):
            if options.get(flag) is not None:
                parts.append(f"{short}{options[flag]:g}")
    if options.get("fit_kept"):
        parts.append("fit")
    if options.get("summary_path"):
        parts.append(Path(options["summary_path"]).stem)
    return "_".join(parts)


def check_run(methods, budgets, options: dict, config=None, ratio=None) -> None:
    """Build every (method, budget) of a run and check it against the model's config (its shape), so
    that a bad method, budget or flag stops the run before the model loads. Raises ValueError."""
    shape = model_shape(config) if config is not None else None
    for method in methods:
        canonical_name(method)
        for budget in budgets:
            compressor = build_compressor(method, None if ratio is not None else budget,
                                          max_capacity_prompt_ratio=ratio, **options)
            if compressor is not None and shape is not None:
                check_compression(compressor.policy, compressor.summary, shape)


def true_or_false(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# -- what the prediction runners (run_longbench.py, run_ruler.py) share -------------------------------

def add_model_arguments(parser, save_dir: str) -> None:
    """The method, the model, the budget and where results go: PyramidKV's flags."""
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)} (any case)")
    parser.add_argument("--model_path", required=True, help="HF folder or hub id, a .gguf file, or 'smollm2'")
    parser.add_argument("--model_name", help="results folder prefix (default: the path's last part, lower case)")
    add_budget_argument(parser, 512, "memory per layer and KV head in token equivalents: K/V entries kept, "
                                     "plus the summary's share with --summary (-1: use the ratio)")
    parser.add_argument("--max_capacity_prompts_ratio", type=float, default=-1,
                        help="budget as a share of each sample's prompt length (with --max_capacity_prompts -1)")
    parser.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's); default: "
                        "bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device_map", help="default: auto with one process, this process's GPU with several")
    parser.add_argument("--save_dir", default=save_dir)


def add_generation_arguments(parser) -> None:
    """Batching, the decode path, the compression and summary flags, and bad data lines."""
    parser.add_argument("--eval_batch_size", type=batch_size_argument, default=1,
                        help="samples per batch, or auto: the most that fit the GPU's memory, longest prompts first")
    parser.add_argument("--use_cache", type=true_or_false, default=True)
    parser.add_argument("--decode", default="auto", choices=DECODE_MODES,
                        help="auto: the static cache with CUDA-graph decode on a GPU (dynamic on the CPU); static; "
                             "dynamic: model.generate over the compressed cache (the reference)")
    add_compression_arguments(parser)
    parser.add_argument("--on_bad_line", default="stop", choices=BAD_LINE_POLICIES,
                        help="what a malformed JSON line in a data or prediction file does")


def batch_size_argument(text):
    try:
        return batch_size_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def set_seed(seed) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_model_name(model_path) -> str:
    name = os.path.basename(str(model_path).rstrip("/"))
    return (name[: -len(".gguf")] if name.endswith(".gguf") else name).lower()


def default_device_map(shard):
    """auto with one process (a model can spread over every GPU), this process's GPU with several."""
    if not torch.cuda.is_available():
        return None
    return {"": shard.local_rank} if shard.world_size > 1 else "auto"


def settings_from_args(args, **extra):
    """The `GenerationSettings` of a runner's flags, checked: a budget given, a ratio budget with a summary
    only one sample at a time, every method, budget and flag built. Then the same against the model's
    config (its shape), read without the weights. Returns (settings, config). Raises ValueError or OSError."""
    options = compression_options(args)
    settings = GenerationSettings(
        method=args.method, max_capacity_prompts=args.max_capacity_prompts,
        max_capacity_prompts_ratio=args.max_capacity_prompts_ratio, eval_batch_size=args.eval_batch_size,
        chat_template=not args.no_chat_template, use_cache=args.use_cache, decode=args.decode,
        compress_kwargs=options, **extra)
    ratio = settings.budget_options().get("max_capacity_prompt_ratio")  # refuses neither budget flag set
    if ratio is not None and args.eval_batch_size != 1 and options.get("summary") \
            and not refits_kept(options["summary"]):
        raise ValueError("--max_capacity_prompts_ratio with a --summary needs --eval_batch_size 1 (each sample "
                         "of a batch gets its own budget, and the summary's clusters must agree)")
    check_run([args.method], [args.max_capacity_prompts], options, None, ratio)
    config = load_config(args.model_path)
    check_run([args.method], [args.max_capacity_prompts], options, config, ratio)
    return settings, config
