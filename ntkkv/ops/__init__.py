"""Attention math with no model knowledge: the plain-torch reference, the log-sum-exp merge,
and the fused Triton kernels (decode attention over a compressed cache, H2O's scores).

Nothing here imports anything else of ntkkv; everything else may import this.
"""

from .attention import empty_part, merge_attention, reference_attention, slot_logit_bias

__all__ = ["empty_part", "merge_attention", "reference_attention", "slot_logit_bias"]
