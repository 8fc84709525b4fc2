"""H2O's heavy-hitter scores on CUDA without the n×n matrix: two fused Triton passes.

Pass 1 computes each query row's log-sum-exp (causal, padding masked), flash-attention style.
Pass 2 walks, for each block of keys, every later block of queries and sums exp(s - lse):
the attention each key receives, summed over the real queries. Both passes read Q and K once
per tile and keep everything else in registers. `ntkkv.policies.h2o` uses the plain-torch
blockwise version as the reference and on other devices.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


if triton is not None:
    _CONFIGS = [triton.Config({"BLOCK_Q": q, "BLOCK_K": k}, num_warps=w, num_stages=st)
                for q, k, w, st in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4),
                                    (64, 128, 4, 3), (128, 32, 4, 4)]]

    @triton.jit
    def _query_tile(Q, b, head, rows, dims, n, sqb, sqh, sqn):
        """(rows, head_dim) of one query head."""
        return tl.load(Q + b * sqb + head * sqh + rows[:, None] * sqn + dims[None, :], mask=rows[:, None] < n,
                       other=0.0)

    @triton.jit
    def _key_tile(K, VALID, b, kv_head, cols, dims, n, skb, skh, skn):
        """(head_dim, cols) of one KV head, transposed for q @ k, and which of those keys are real."""
        keys = tl.load(K + b * skb + kv_head * skh + cols[None, :] * skn + dims[:, None], mask=cols[None, :] < n,
                       other=0.0)
        return keys, tl.load(VALID + b * n + cols, mask=cols < n, other=0) != 0

    @triton.autotune(configs=_CONFIGS, key=["HEAD_DIM"])
    @triton.jit
    def _row_lse(Q, K, VALID, LSE, scale_log2, n, heads, group, sqb, sqh, sqn, skb, skh, skn,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr):
        block, batch_head = tl.program_id(0), tl.program_id(1)
        b, head = batch_head // heads, batch_head % heads
        rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = tl.arange(0, HEAD_DIM)
        q = _query_tile(Q, b, head, rows, dims, n, sqb, sqh, sqn)
        running_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(0, (block + 1) * BLOCK_Q, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            k, key_valid = _key_tile(K, VALID, b, head // group, cols, dims, n, skb, skh, skn)
            allowed = (cols[None, :] <= rows[:, None]) & key_valid[None, :]
            s = tl.where(allowed, tl.dot(q, k) * scale_log2, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(s, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing real yet
            running_sum = running_sum * tl.exp2(running_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), 1)
            running_max = new_max
        tl.store(LSE + batch_head * n + rows, running_max + tl.log2(running_sum), mask=rows < n)

    @triton.autotune(configs=_CONFIGS, key=["HEAD_DIM"])
    @triton.jit
    def _column_sums(Q, K, VALID, LSE, OUT, scale_log2, n, heads, group, sqb, sqh, sqn, skb, skh, skn,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr):
        block, batch_head = tl.program_id(0), tl.program_id(1)
        b, head = batch_head // heads, batch_head % heads
        cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
        dims = tl.arange(0, HEAD_DIM)
        k, key_valid = _key_tile(K, VALID, b, head // group, cols, dims, n, skb, skh, skn)
        totals = tl.zeros([BLOCK_K], tl.float32)
        for start in range((block * BLOCK_K // BLOCK_Q) * BLOCK_Q, n, BLOCK_Q):
            rows = start + tl.arange(0, BLOCK_Q)
            q = _query_tile(Q, b, head, rows, dims, n, sqb, sqh, sqn)
            query_valid = tl.load(VALID + b * n + rows, mask=rows < n, other=0) != 0
            lse = tl.load(LSE + batch_head * n + rows, mask=rows < n, other=0.0)
            allowed = (cols[None, :] <= rows[:, None]) & key_valid[None, :] & query_valid[:, None]
            totals += tl.sum(tl.where(allowed, tl.exp2(tl.dot(q, k) * scale_log2 - lse[:, None]), 0.0), 0)
        tl.store(OUT + batch_head * n + cols, totals, mask=cols < n)


def heavy_hitter_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """queries (batch, heads, n, d), keys (batch, kv_heads, n, d), valid (batch, n) ->
    (batch, heads, n) float32: attention each key receives, summed over the real queries."""
    batch, heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    valid = valid.to(torch.int8).contiguous()
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=queries.device)
    totals = torch.empty_like(lse)
    scale_log2 = scaling * math.log2(math.e)
    strides = (*[queries.stride(i) for i in range(3)], *[keys.stride(i) for i in range(3)])
    group = heads // kv_heads
    _row_lse[lambda meta: (triton.cdiv(n, meta["BLOCK_Q"]), batch * heads)](
        queries, keys, valid, lse, scale_log2, n, heads, group, *strides, HEAD_DIM=head_dim)
    _column_sums[lambda meta: (triton.cdiv(n, meta["BLOCK_K"]), batch * heads)](
        queries, keys, valid, lse, totals, scale_log2, n, heads, group, *strides, HEAD_DIM=head_dim)
    return totals
