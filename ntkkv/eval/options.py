"""Command-line flags for the compression parameters, shared by the runners, and the check of a
run's settings against the model's config before any weights load."""

from __future__ import annotations

import argparse
from pathlib import Path

from ntkkv.models import model_shape
from ntkkv.patch import OPTION_ALIASES, build_compressor
from ntkkv.plan import check_compression
from ntkkv.policies import canonical_name
from ntkkv.summaries import SUMMARIES, canonical_summary

SELECTION_FLAGS = ("window_size", "kernel_size", "pooling", "gqa_reduce")
SUMMARY_FLAGS = ("summary", "state_budget", "cluster_by", "rank", "summary_path", "ratchet")


def add_compression_arguments(parser) -> None:
    group = parser.add_argument_group("compression (defaults: the original harness's)")
    group.add_argument("--window_size", type=int, default=None,
                       help="last tokens always kept, SnapKV's observation window (default 8; StreamingLLM budget-4)")
    group.add_argument("--kernel_size", type=int, default=None, help="pooling width of the scores (default 7)")
    group.add_argument("--pooling", default=None, help="avgpool or maxpool (default maxpool)")
    group.add_argument("--gqa_reduce", default=None, help="mean or max over a KV head's query heads (default mean)")
    summaries = parser.add_argument_group("evicted tokens (the budget counts their summary: equal memory)")
    summaries.add_argument("--summary", "--kernel", dest="summary", default=None,
                           help=f"what happens to evicted tokens: {', '.join(SUMMARIES)} (default none: dropped)")
    summaries.add_argument("--state_budget", type=float, default=None,
                           help="share of the budget the summary may use: a fraction < 1 or tokens (default 0.125)")
    summaries.add_argument("--cluster_by", default=None, help="kmeans (default) or position")
    summaries.add_argument("--rank", type=int, default=None, help="taylor2_lowrank's rank (default 4)")
    summaries.add_argument("--summary_path", "--kernel_path", dest="summary_path", default=None,
                           help="the file of a learned map (train_learned_map.py), for --summary learned")
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
    """The name a run's results go under: the method, and the summary with its settings if any
    ("snapkv", "snapkv_merge", "pyramidkv_taylor2_lowrank_sb0.25_r8"), so runs never mix on resume."""
    options = recorded_options(options)
    summary = options.get("summary")
    if summary is None or summary == "none":
        return method
    parts = [method, summary]
    for flag, short in (("state_budget", "sb"), ("cluster_by", "by"), ("rank", "r"), ("ratchet", "ratchet")):
        if options.get(flag) is not None:
            parts.append(f"{short}{options[flag]:g}" if isinstance(options[flag], float) else f"{short}{options[flag]}")
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
