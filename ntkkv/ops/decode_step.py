"""The small fused kernels of one static decode step, each with its plain-torch reference.

A decode step of an 8B model at batch 1 reads its weights in 3.7 ms; what else it costs is mostly
the count of small kernels. These fold the elementwise work around the matrix products into one
kernel each, computing exactly what the eager modules compute, rounding included (each op of the
reference rounds to the model's dtype, and so does the kernel at the same points):

  add_rms_norm   the residual add and the RMSNorm that follows it (Llama, Mistral, Qwen2's norm)
  rotary_write   RoPE (rotate-half) of the new token's queries and keys, and the key and value
                 written into a static cache layer at its write index, the slot's bias set to 0
                 (one index for every head, or in a ragged layer each head's own slot)
  silu_mul       silu(gate) * up, the gated MLP's middle

On CPU tensors, or without triton, the references run (the CPU path and the tests' reference);
NTKKV_FORCE_TRITON=1 with TRITON_INTERPRET=1 runs the kernels on CPU tensors in the interpreter.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's CPU wheels ship no triton
    triton = None

FORCE_TRITON_ENV = "NTKKV_FORCE_TRITON"


def fused(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for this tensor (CUDA, or forced into the interpreter)."""
    if triton is None:
        return False
    return tensor.is_cuda or os.environ.get(FORCE_TRITON_ENV) == "1"


if triton is not None:
    @triton.jit
    def _add_rms_norm(X, RESIDUAL, WEIGHT, OUT, NEW_RESIDUAL, width, eps, HAS_RESIDUAL: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        x = tl.load(X + row * width + columns, mask=inside, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(RESIDUAL + row * width + columns, mask=inside, other=0.0).to(tl.float32))
            x = x.to(X.dtype.element_ty)  # the eager add rounds to the model's dtype
            tl.store(NEW_RESIDUAL + row * width + columns, x, mask=inside)
        values = x.to(tl.float32)
        variance = tl.sum(values * values, axis=0) / width
        normed = (values * (1.0 / tl.sqrt(variance + eps))).to(X.dtype.element_ty)
        weight = tl.load(WEIGHT + columns, mask=inside, other=0.0)
        out = (weight.to(tl.float32) * normed.to(tl.float32)).to(OUT.dtype.element_ty)
        tl.store(OUT + row * width + columns, out, mask=inside)

    @triton.jit
    def _rotate(x_ptr, cos_ptr, sin_ptr, half: tl.constexpr):
        """RoPE of one head: (x·cos + rotate_half(x)·sin), each product and the sum rounded to x's dtype."""
        first = tl.arange(0, half)
        x1 = tl.load(x_ptr + first).to(tl.float32)
        x2 = tl.load(x_ptr + half + first).to(tl.float32)
        c1 = tl.load(cos_ptr + first).to(tl.float32)
        c2 = tl.load(cos_ptr + half + first).to(tl.float32)
        s1 = tl.load(sin_ptr + first).to(tl.float32)
        s2 = tl.load(sin_ptr + half + first).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        return out1.to(dtype), out2.to(dtype)

    @triton.jit
    def _rotary_write(Q, K, V, COS, SIN, Q_OUT, CACHE_K, CACHE_V, CACHE_BIAS, WRITE_INDEX,
                      heads, kv_heads, capacity, HALF: tl.constexpr, RAGGED: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        dims = 2 * HALF
        first = tl.arange(0, HALF)
        cos, sin = COS + b * dims, SIN + b * dims
        if head < heads:
            out1, out2 = _rotate(Q + (b * heads + head) * dims, cos, sin, HALF)
            target = Q_OUT + (b * heads + head) * dims
            tl.store(target + first, out1)
            tl.store(target + HALF + first, out2)
        else:
            kv = head - heads
            if RAGGED:  # (b, T, d) caches: each head writes its own slot of its sample's flat run
                row = b * capacity + tl.load(WRITE_INDEX + b * kv_heads + kv).to(tl.int64)
            else:
                row = (b * kv_heads + kv) * capacity + tl.load(WRITE_INDEX).to(tl.int64)
            out1, out2 = _rotate(K + (b * kv_heads + kv) * dims, cos, sin, HALF)
            tl.store(CACHE_K + row * dims + first, out1.to(CACHE_K.dtype.element_ty))
            tl.store(CACHE_K + row * dims + HALF + first, out2.to(CACHE_K.dtype.element_ty))
            whole = tl.arange(0, 2 * HALF)
            value = tl.load(V + (b * kv_heads + kv) * dims + whole)
            tl.store(CACHE_V + row * dims + whole, value.to(CACHE_V.dtype.element_ty))
            tl.store(CACHE_BIAS + row, 0.0)

    @triton.jit
    def _silu_mul(GATE, UP, OUT, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        gate = tl.load(GATE + offsets, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(UP + offsets, mask=inside, other=0.0).to(tl.float32)
        dtype = OUT.dtype.element_ty
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(OUT + offsets, (activated * up).to(dtype), mask=inside)


# -- add + RMSNorm ------------------------------------------------------------------------------

def add_rms_norm_reference(x, residual, weight, eps: float):
    """(weight · norm(x + residual), x + residual) as the eager modules compute them; residual may be None."""
    if residual is not None:
        x = residual + x
    values = x.to(torch.float32)
    normed = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def add_rms_norm(x, residual, weight, eps: float):
    """The residual add and the RMSNorm after it, in one kernel on CUDA. x (..., width)."""
    if not fused(x):
        return add_rms_norm_reference(x, residual, weight, eps)
    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    rows = x.numel() // width
    _add_rms_norm[(rows,)](x, residual.contiguous() if residual is not None else x, weight, out, new_residual,
                           width, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(width))
    return out, new_residual


# -- RoPE and the cache write ----------------------------------------------------------------------

def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_write_reference(queries, keys, values, cos, sin, cache_keys, cache_values, cache_bias, write_index):
    """queries (b, heads, d), keys/values (b, kv_heads, d), cos/sin (b, d) -> rotated queries (b, heads, d);
    the rotated keys and the values written into the cache layer at `write_index`: a one-element tensor for
    a uniform layer (b, kv_heads, C, d), each head's slot (b, kv_heads) for a ragged one (b, T, d)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated_queries = (queries * cos) + (rotate_half(queries) * sin)
    rotated_keys = (keys * cos) + (rotate_half(keys) * sin)
    if _is_ragged(keys, cache_keys, write_index):
        samples = torch.arange(cache_keys.shape[0], device=cache_keys.device)[:, None].expand_as(write_index)
        index = (samples, write_index.long())
        cache_keys.index_put_(index, rotated_keys.to(cache_keys.dtype))
        cache_values.index_put_(index, values.to(cache_values.dtype))
        # a device tensor, not a python 0.0: a host-to-device copy cannot be captured in a CUDA graph
        cache_bias.index_put_(index, cache_bias.new_zeros(write_index.shape))
        return rotated_queries
    index = write_index.view(1)
    cache_keys.index_copy_(2, index, rotated_keys[:, :, None].to(cache_keys.dtype))
    cache_values.index_copy_(2, index, values[:, :, None].to(cache_values.dtype))
    cache_bias.index_fill_(2, index, 0.0)
    return rotated_queries


def rotary_write(queries, keys, values, cos, sin, cache_keys, cache_values, cache_bias, write_index):
    """RoPE of the new token's queries and keys and the static cache write, in one kernel on CUDA.

    A uniform cache layer: cache_keys/values (b, kv_heads, C, d), cache_bias (b, kv_heads, C), write_index
    a one-element tensor, the same slot for every head. A ragged one: cache_keys/values (b, T, d),
    cache_bias (b, T), write_index (b, kv_heads) integers, each head's absolute slot in its sample's run."""
    ragged = _is_ragged(keys, cache_keys, write_index)
    half = queries.shape[-1] // 2
    capacity = _slot_rows(cache_keys, cache_values, cache_bias)
    if not fused(queries) or half < 16 or half & (half - 1) or capacity is None:
        return rotary_write_reference(queries, keys, values, cos, sin, cache_keys, cache_values, cache_bias,
                                      write_index)
    batch, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
    cos, sin = cos.to(queries.dtype).contiguous(), sin.to(queries.dtype).contiguous()
    rotated = torch.empty_like(queries)
    _rotary_write[(batch, heads + kv_heads)](queries, keys, values, cos, sin, rotated, cache_keys, cache_values,
                                             cache_bias, write_index.contiguous(), heads, kv_heads, capacity,
                                             HALF=head_dim // 2, RAGGED=ragged)
    return rotated


def _slot_rows(cache_keys, cache_values, cache_bias) -> int | None:
    """The slots from one row of the cache layer to the next (a row: a sample's run in a ragged layer, a
    head's in a uniform one), which may exceed a row's length (a ragged layer is a view of a wider
    buffer); None if the layer is not laid out as the kernel addresses it (slots dense, rows evenly spaced)."""
    capacity, head_dim = cache_bias.stride(-2), cache_keys.shape[-1]
    dense = all(cache.stride(-1) == 1 and cache.stride(-2) == head_dim and cache.stride(-3) == capacity * head_dim
                for cache in (cache_keys, cache_values)) and cache_bias.stride(-1) == 1
    if cache_keys.dim() == 4 and cache_keys.shape[0] > 1:  # uniform: the samples' blocks of heads follow on
        heads = cache_keys.shape[1]
        dense = dense and cache_bias.stride(0) == heads * capacity and all(
            cache.stride(0) == heads * capacity * head_dim for cache in (cache_keys, cache_values))
    return capacity if dense else None


def _is_ragged(keys, cache_keys, write_index) -> bool:
    """Whether the cache layer is ragged ((b, T, d), a slot per head) or uniform ((b, kv_heads, C, d), one slot)."""
    ragged = cache_keys.dim() == 3
    if ragged and tuple(write_index.shape) != tuple(keys.shape[:2]):
        raise ValueError(f"a ragged cache layer (b, T, d) takes write_index (b, kv_heads) = {tuple(keys.shape[:2])}, "
                         f"one slot per head; got {tuple(write_index.shape)}")
    if not ragged and write_index.numel() != 1:
        raise ValueError(f"a uniform cache layer (b, kv_heads, C, d) takes a one-element write_index; "
                         f"got shape {tuple(write_index.shape)}")
    return ragged


# -- the gated MLP's middle ------------------------------------------------------------------------

def silu_mul_reference(gate, up):
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate, up):
    """silu(gate) * up in one kernel on CUDA."""
    if not fused(gate):
        return silu_mul_reference(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    count = gate.numel()
    block = 1024
    _silu_mul[(triton.cdiv(count, block),)](gate, up, out, count, BLOCK=block)
    return out
