"""Command-line flags for the compression parameters, shared by the runners."""

from __future__ import annotations

from pathlib import Path

from ntkkv.kernels import KERNELS

SELECTION_FLAGS = ("window_size", "kernel_size", "pooling", "gqa_reduce")
KERNEL_FLAGS = ("kernel", "state_budget", "cluster_by", "rank", "kernel_path", "ratchet")


def add_compression_arguments(parser) -> None:
    group = parser.add_argument_group("compression (defaults: the original harness's)")
    group.add_argument("--window_size", type=int, default=None,
                       help="last tokens always kept, SnapKV's observation window (default 8; StreamingLLM budget-4)")
    group.add_argument("--kernel_size", type=int, default=None, help="pooling width of the scores (default 7)")
    group.add_argument("--pooling", default=None, help="avgpool or maxpool (default maxpool)")
    group.add_argument("--gqa_reduce", default=None, help="mean or max over a KV head's query heads (default mean)")
    kernels = parser.add_argument_group("evicted tokens (the budget counts their summary: equal memory)")
    kernels.add_argument("--kernel", default=None,
                         help=f"what happens to evicted tokens: {', '.join(KERNELS)} (default none: dropped)")
    kernels.add_argument("--state_budget", type=float, default=None,
                         help="share of the budget the kernel may use: a fraction < 1 or tokens (default 0.125)")
    kernels.add_argument("--cluster_by", default=None, help="kmeans (default) or position")
    kernels.add_argument("--rank", type=int, default=None, help="taylor2_lowrank's rank (default 4)")
    kernels.add_argument("--kernel_path", default=None, help="the file of a learned kernel (train_kernel.py)")
    kernels.add_argument("--ratchet", type=int, default=None,
                         help="keep at most this many generated tokens exact; older ones fold into the kernel "
                              "(dropped with kernel none), so memory stays flat (default off)")


def compression_options(args) -> dict:
    """The flags given, as keyword arguments of ntkkv.compress (unset ones left to its defaults)."""
    return {name: getattr(args, name) for name in SELECTION_FLAGS + KERNEL_FLAGS
            if getattr(args, name, None) is not None}


def run_label(method: str, options: dict) -> str:
    """The name a run's results go under: the method, and the kernel with its settings if any
    ("snapkv", "snapkv_merge", "pyramidkv_taylor2_lowrank_sb0.25_r8"), so runs never mix on resume."""
    kernel = options.get("kernel")
    if kernel is None or str(kernel).lower() == "none":
        return method
    parts = [method, str(kernel).lower()]
    for flag, short in (("state_budget", "sb"), ("cluster_by", "by"), ("rank", "r"), ("ratchet", "ratchet")):
        if options.get(flag) is not None:
            parts.append(f"{short}{options[flag]:g}" if isinstance(options[flag], float) else f"{short}{options[flag]}")
    if options.get("kernel_path"):
        parts.append(Path(options["kernel_path"]).stem)
    return "_".join(parts)
