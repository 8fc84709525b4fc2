"""Command-line flags for the compression parameters, shared by the runners."""

from __future__ import annotations


def add_compression_arguments(parser) -> None:
    group = parser.add_argument_group("compression (defaults: the original harness's)")
    group.add_argument("--window_size", type=int, default=None,
                       help="last tokens always kept, SnapKV's observation window (default 8; StreamingLLM budget-4)")
    group.add_argument("--kernel_size", type=int, default=None, help="pooling width of the scores (default 7)")
    group.add_argument("--pooling", default=None, help="avgpool or maxpool (default maxpool)")
    group.add_argument("--gqa_reduce", default=None, help="mean or max over a KV head's query heads (default mean)")


def compression_options(args) -> dict:
    """The flags given, as keyword arguments of ntkkv.compress (unset ones left to its defaults)."""
    names = ("window_size", "kernel_size", "pooling", "gqa_reduce")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
