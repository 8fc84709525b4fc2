"""States that keep evicted tokens' share of attention, read through a kernel at decode time."""

from .state import ExactKernel, ExactState, KernelState, LinearKernel, LinearState, merge_attention

__all__ = ["ExactKernel", "ExactState", "KernelState", "LinearKernel", "LinearState", "merge_attention"]
