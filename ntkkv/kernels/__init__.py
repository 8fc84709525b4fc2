"""What happens to evicted tokens: kernels by name (`build_kernel`), their states, and the
log-sum-exp merge with the softmax over kept slots."""

from .registry import KERNELS, ClusterKernel, KernelPlan, Summary, build_kernel
from .state import (
           ExactKernel,
           ExactState,
           KernelState,
           LinearKernel,
           LinearState,
           merge_attention,
)

__all__ = ["KERNELS", "ClusterKernel", "ExactKernel", "ExactState", "KernelPlan", "KernelState", "LinearKernel",
           "LinearState", "Summary", "build_kernel", "merge_attention"]
