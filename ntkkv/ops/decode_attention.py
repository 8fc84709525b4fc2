"""Decode-time attention over a compressed cache, merged with a summary state, as fused Triton kernels.

At decode each KV head has S kept slots, each with an additive float32 bias (0 a token, -inf
padding, log n a slot standing for n merged tokens), and optionally a state that gives, per
query row, the log of the evicted tokens' total weight (`log_mass`) and their weighted mean
value (`state_mean`). The output is the softmax over the slots merged with the state through
the log-sum-exp: `merge_attention(*reference_attention(...), log_mass, state_mean)`.

Flash-decoding: with one new token the queries of a KV head are a handful of rows, so one
program per (batch, KV head) would leave most of the GPU idle. `_partial_attention` splits the
slots into chunks, one program each, and writes each chunk's running (max, sum, weighted sum);
`_combine_and_merge` folds the chunks of a (batch, KV head) together, a few at a time so that
their loads overlap, and merges the state. Logits live in base 2 (exp2 is the cheap
instruction); everything accumulates in float32.

Ragged layout (head-wise budgets: heads of one sample holding different numbers of slots): keys,
values (b, T, d) and the bias (b, T) hold the heads of a sample one after another, head h's run
starting at head_starts[b, h] and holding head_used[b, h] slots. The same kernels read it: only a
program's base pointer (start x slot stride for head x head stride) and its slot limit change, and a
chunk past its head's end runs no tile and leaves a part of no weight for the combine.

Precision: fp32 K/V use IEEE fp32 dots (no TF32). For 16-bit K/V the dots run on tensor cores
in the cache's dtype, and whatever is float32 on the other side (queries of another dtype, the
probabilities) goes in as a high and a low 16-bit part, so the result stays float32-class
(about 1e-5 relative) instead of the 16-bit rounding of the probabilities (about 4e-3).

Without triton or on CPU tensors `merged_decode_attention` falls back to the plain-torch
composition; `force_triton=True` runs the kernels on CPU tensors under TRITON_INTERPRET=1
(set before this module is imported: `triton.jit` reads it when the kernels are defined).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from contextlib import nullcontext

import torch

from .attention import empty_part, merge_attention, reference_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's CPU wheels ship no triton
    triton = None

# whether the kernels below are defined for the interpreter, which runs them on CPU tensors
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

HEAD_DIMS = (16, 32, 64, 128, 256)
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FORCE_TRITON_ENV = "NTKKV_FORCE_TRITON"
MAX_BLOCK_ROWS = 64
# programs per SM that the split over slots aims for: a few waves hide the tail of the last one
PROGRAMS_PER_SM = 4
# SM count assumed off-GPU (the interpreter): small, so that tests on CPU still split S
CPU_SM_COUNT = 4
# chunks the combine folds per loop step, their loads issued together (one memory latency per group)
COMBINE_SPLIT_GROUP = 4
# a ragged cache's longest head gets more chunks than its average head only while they keep at least this
# many slots: each extra chunk is one more step of the combine's serial loop, which a short chunk does not repay
RAGGED_MIN_CHUNK = 2048

if triton is not None:
    _LOG2E = tl.constexpr(math.log2(math.e))

    @triton.jit
    def _dot16(a, b, acc, INTERPRETED: tl.constexpr):
        """tl.dot of 16-bit operands into a float32 accumulator."""
        # the interpreter multiplies bfloat16's raw bits in tl.dot (triton-lang/triton#11584); in
        # float32 its numpy matmul gives the same products, which 16-bit inputs make exact anyway
        if INTERPRETED:
            result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            result = tl.dot(a, b, acc)
        return result

    @triton.jit
    def _partial_attention(
        Q, K, V, BIAS, USED, HEAD_START, PART_MAX, PART_SUM, PART_ACC,
        scale_log2, num_rows, num_slots, chunk, num_splits, kv_heads,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_bias_b, stride_bias_h, stride_bias_s,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        KV_FP32: tl.constexpr, SPLIT_QUERIES: tl.constexpr, INTERPRETED: tl.constexpr, HAS_USED: tl.constexpr,
        RAGGED: tl.constexpr,
    ):
        """One chunk of slots of one (batch, KV head) and one block of query rows: the chunk's
        max logit (base 2), sum of exp2(logit - max) and the sum of those weights times values.
        With HAS_USED, slots from USED[0] on are not read (a static cache's unwritten room).
        RAGGED: K, V (b, T, d) and BIAS (b, T); head h of sample b reads its USED[b, h] slots from
        HEAD_START[b, h] on (both (b, hkv), contiguous), at most num_slots of them."""
        split, batch_head, row_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # int64 base offsets: batch x head x slots x dim can pass 2^31 elements on long caches
        b = (batch_head // kv_heads).to(tl.int64)
        h = (batch_head % kv_heads).to(tl.int64)
        if RAGGED:  # the head's run inside its sample's flat run of slots: only the base and the limit change
            start = tl.load(HEAD_START + batch_head).to(tl.int64)
            slot_limit = tl.minimum(tl.load(USED + batch_head).to(tl.int32), num_slots)
            key_base = K + b * stride_kb + start * stride_ks
            value_base = V + b * stride_vb + start * stride_vs
            bias_base = BIAS + b * stride_bias_b + start * stride_bias_s
            # a chunk past the head's end runs no tile and stores max -inf, sum 0: nothing to the combine
            tiles_end = tl.minimum(chunk, tl.maximum(slot_limit - split * chunk, 0))
        else:
            slot_limit = num_slots
            if HAS_USED:
                slot_limit = tl.minimum(tl.load(USED).to(tl.int32), num_slots)
            key_base = K + b * stride_kb + h * stride_kh
            value_base = V + b * stride_vb + h * stride_vh
            bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
            tiles_end = chunk
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        dims = tl.arange(0, HEAD_DIM)
        queries = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                          mask=row_ok[:, None], other=0.0).to(tl.float32)
        if not KV_FP32:
            queries_hi = queries.to(K.dtype.element_ty)
            if SPLIT_QUERIES:  # queries finer than the cache's dtype: keep the rounding error as a second part
                queries_lo = (queries - queries_hi.to(tl.float32)).to(K.dtype.element_ty)

        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # every chunk of a uniform cache runs the same number of tiles; the surplus of the last one is masked off
        for offset in range(0, tiles_end, BLOCK_N):
            slots = split * chunk + offset + tl.arange(0, BLOCK_N)
            slot_ok = slots < slot_limit
            keys_t = tl.load(key_base + slots[None, :] * stride_ks + dims[:, None], mask=slot_ok[None, :], other=0.0)
            values = tl.load(value_base + slots[:, None] * stride_vs + dims[None, :], mask=slot_ok[:, None], other=0.0)
            bias = tl.load(bias_base + slots * stride_bias_s, mask=slot_ok, other=float("-inf"))
            if KV_FP32:
                dots = tl.dot(queries, keys_t, input_precision="ieee")
            elif SPLIT_QUERIES:
                dots = _dot16(queries_lo, keys_t, _dot16(queries_hi, keys_t, None, INTERPRETED), INTERPRETED)
            else:
                dots = _dot16(queries_hi, keys_t, None, INTERPRETED)
            logits = dots * scale_log2 + bias[None, :] * _LOG2E

            new_max = tl.maximum(running_max, tl.max(logits, 1))
            # a row that has seen only -inf slots keeps max -inf; shifting by 0 makes its weights 0, not NaN
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp2(running_max - shift)
            weights = tl.exp2(logits - shift[:, None])
            running_sum = running_sum * rescale + tl.sum(weights, 1)
            acc = acc * rescale[:, None]
            if KV_FP32:
                acc = tl.dot(weights, values, acc, input_precision="ieee")
            else:
                weights_hi = weights.to(V.dtype.element_ty)
                weights_lo = (weights - weights_hi.to(tl.float32)).to(V.dtype.element_ty)
                acc = _dot16(weights_lo, values, _dot16(weights_hi, values, acc, INTERPRETED), INTERPRETED)
            running_max = new_max

        part = (batch_head * num_splits + split).to(tl.int64) * num_rows + rows
        tl.store(PART_MAX + part, running_max, mask=row_ok)
        tl.store(PART_SUM + part, running_sum, mask=row_ok)
        tl.store(PART_ACC + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _combine_and_merge(
        PART_MAX, PART_SUM, PART_ACC, LOG_MASS, STATE_MEAN, OUT,
        num_rows, num_splits, kv_heads,
        stride_lb, stride_lh, stride_lm, stride_sb, stride_sh, stride_sm,
        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_STATE: tl.constexpr, SPLIT_GROUP: tl.constexpr,
    ):
        """All chunks of one (batch, KV head) and block of rows -> the kept part, merged with the state."""
        batch_head, row_block = tl.program_id(0), tl.program_id(1)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        dims = tl.arange(0, HEAD_DIM)
        kept_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        kept_sum = tl.zeros([BLOCK_M], tl.float32)
        kept_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # SPLIT_GROUP chunks unrolled: their loads are in flight together; a chunk past the end folds in as
        # max -inf, sum 0, which leaves the running values bit for bit as they were
        for first in range(0, num_splits, SPLIT_GROUP):
            for offset in tl.static_range(SPLIT_GROUP):
                split = first + offset
                split_ok = row_ok & (split < num_splits)
                part = (batch_head * num_splits + split).to(tl.int64) * num_rows + rows
                split_max = tl.load(PART_MAX + part, mask=split_ok, other=float("-inf"))
                split_sum = tl.load(PART_SUM + part, mask=split_ok, other=0.0)
                split_acc = tl.load(PART_ACC + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None],
                                    other=0.0)
                new_max = tl.maximum(kept_max, split_max)
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                kept_scale = tl.exp2(kept_max - shift)
                split_scale = tl.exp2(split_max - shift)
                kept_sum = kept_sum * kept_scale + split_sum * split_scale
                kept_acc = kept_acc * kept_scale[:, None] + split_acc * split_scale[:, None]
                kept_max = new_max
        # the kept part's total weight is kept_sum * 2^kept_shift; kept_sum >= 1 unless every slot is -inf
        kept_shift = tl.where(kept_max == float("-inf"), 0.0, kept_max)

        if HAS_STATE:
            b = (batch_head // kv_heads).to(tl.int64)
            h = (batch_head % kv_heads).to(tl.int64)
            state_log2 = tl.load(LOG_MASS + b * stride_lb + h * stride_lh + rows * stride_lm,
                                 mask=row_ok, other=float("-inf")) * _LOG2E
            state_mean = tl.load(STATE_MEAN + b * stride_sb + h * stride_sh + rows[:, None] * stride_sm + dims[None, :],
                                 mask=row_ok[:, None], other=0.0)
            # merge_attention's arithmetic in base 2; weighting the un-normalised sum by 2^(shift - top)
            # equals weighting the kept mean by 2^(lse - top), without dividing by a zero kept_sum
            top = tl.maximum(kept_shift + tl.log2(kept_sum), state_log2)
            top = tl.where(top == float("-inf"), 0.0, top)  # nothing at all: 0/0 = NaN, as merge_attention
            kept_weight = tl.exp2(kept_shift - top)
            state_weight = tl.exp2(state_log2 - top)
            numerator = kept_acc * kept_weight[:, None] + state_mean * state_weight[:, None]
            output = numerator / (kept_sum * kept_weight + state_weight)[:, None]
        else:
            # every slot -inf and no state: 0, as reference_attention's nan_to_num gives
            output = tl.where(kept_sum[:, None] > 0, kept_acc / kept_sum[:, None], 0.0)
        out_rows = batch_head.to(tl.int64) * num_rows + rows
        tl.store(OUT + out_rows[:, None] * HEAD_DIM + dims[None, :], output.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])


def merged_decode_attention_reference(queries, keys, values, slot_bias, scaling, log_mass=None, state_mean=None, *,
                                      head_starts=None, head_used=None, max_head_slots=None):
    """The plain-torch composition `merged_decode_attention` computes; the test reference and the fallback.
    The ragged layout goes one (batch, KV head) at a time over the head's own run of slots."""
    _check_inputs(queries, keys, values, slot_bias, log_mass, state_mean, head_starts, head_used)
    if head_starts is None:
        lse, output = reference_attention(queries, keys, values, slot_bias.float()[:, :, None, :], scaling)
    else:
        lse, output = empty_part(queries)
        for b, runs in enumerate(_head_runs(head_starts, head_used, keys.shape[1], max_head_slots)):
            for h, (start, used) in enumerate(runs):
                run = slice(start, start + used)
                lse[b, h], output[b, h] = reference_attention(queries[b, h], keys[b, run], values[b, run],
                                                              slot_bias[b, run].float(), scaling)
    if log_mass is None:
        return output
    return merge_attention(lse, output, log_mass.float(), state_mean.float())


def merged_decode_attention(queries, keys, values, slot_bias, scaling, log_mass=None, state_mean=None, *,
                            force_triton: bool | None = None, num_splits: int | None = None, used_slots=None,
                            out_dtype: torch.dtype = torch.float32, head_starts=None, head_used=None,
                            max_head_slots: int | None = None):
    """Attention of one decode step over the kept slots, merged with the summary state.

    queries (b, hkv, m, d): the query heads sharing a KV head stacked on m (group size x new tokens);
    keys, values (b, hkv, S, d) in bf16, fp16 or fp32 (one dtype); slot_bias (b, hkv, S), the same
    for every query row (no causal part); log_mass (b, hkv, m) and state_mean (b, hkv, m, d), or
    both None. Returns (b, hkv, m, d) float32, equal to
    `merge_attention(*reference_attention(q, k, v, slot_bias[:, :, None, :], scaling), log_mass, state_mean)`
    (the reference output alone without a state). A row with every slot -inf gives 0 without a
    state and the state's mean with one; with an empty state too (log_mass -inf) it is NaN, as in
    `merge_attention`. Inference only: no autograd.

    force_triton: None runs the Triton kernels on CUDA tensors when triton is installed and the
    reference otherwise (NTKKV_FORCE_TRITON=1 in the environment counts as True); True runs them
    whatever the device (CPU tensors need TRITON_INTERPRET=1); False always runs the reference.
    num_splits: how many chunks the slots are split into (default: from S and the SM count).
    used_slots: a one-element integer tensor, or None: the slots from this index on are unwritten room
    (their bias must be -inf); the kernels do not read them. The reference reads every slot.
    out_dtype: the output's dtype (the kernels compute in float32 and round once when they store).

    Ragged layout (heads holding different numbers of slots), with head_starts and head_used, int32
    or int64 tensors (b, hkv) on the device: keys, values (b, T, d) and slot_bias (b, T) hold one flat
    run of slots per sample, and KV head h of sample b attends over slots
    [head_starts[b, h], head_starts[b, h] + head_used[b, h]) of it; nothing else is read (a head with
    no slot is a row with every slot -inf above). max_head_slots: a host-side bound of head_used that
    plans the split (num_splits then counts chunks of the longest head); None reads it from head_used,
    which waits for the device (no CUDA graph capture). The kernels read at most max_head_slots slots
    of a head; the reference refuses a head_used above it. used_slots is for the uniform layout only.
    """
    _check_inputs(queries, keys, values, slot_bias, log_mass, state_mean, head_starts, head_used)
    if head_starts is None and max_head_slots is not None:
        raise ValueError("max_head_slots is for the ragged layout: pass it with head_starts and head_used")
    if head_starts is not None and used_slots is not None:
        raise ValueError("used_slots is for the uniform layout; in the ragged one head_used says what each head reads")
    if max_head_slots is not None and (not isinstance(max_head_slots, int) or max_head_slots < 0):
        raise ValueError(f"max_head_slots must be a non-negative int, got {max_head_slots!r}")
    head_dim = queries.shape[-1]
    if head_dim not in HEAD_DIMS:
        if force_triton:
            raise ValueError(f"merged_decode_attention: head_dim {head_dim} is not supported by the Triton kernels; "
                             f"it must be one of {', '.join(map(str, HEAD_DIMS))}")
        force_triton = False  # the plain-torch composition takes any head_dim
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"merged_decode_attention: num_splits must be at least 1, got {num_splits}")
    ragged = {"head_starts": head_starts, "head_used": head_used, "max_head_slots": max_head_slots}
    if not _takes_triton_path(queries, force_triton):
        output = merged_decode_attention_reference(queries, keys, values, slot_bias, scaling, log_mass, state_mean,
                                                   **ragged)
        return output.to(out_dtype)
    return _triton_forward(queries, keys, values, slot_bias, scaling, log_mass, state_mean, num_splits, used_slots,
                           out_dtype, **ragged)


def _check_inputs(queries, keys, values, slot_bias, log_mass, state_mean, head_starts=None, head_used=None):
    """Shapes, dtypes and devices, with messages that say which argument is wrong."""
    if (head_starts is None) != (head_used is None):
        raise ValueError("head_starts and head_used go together: pass both (the ragged layout) or neither")
    ragged = head_starts is not None
    kv_dims = 3 if ragged else 4  # ragged: (b, T, d), every head's run in one flat run per sample
    for name, tensor, dims in [("queries", queries, 4), ("keys", keys, kv_dims), ("values", values, kv_dims),
                               ("slot_bias", slot_bias, kv_dims - 1)]:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            layout = " (the ragged layout, with head_starts)" if ragged and name != "queries" else ""
            raise ValueError(f"{name} must be a {dims}-d tensor{layout}, got {shape}")
    batch, kv_heads, num_rows, head_dim = queries.shape
    num_slots = keys.shape[-2]
    run = (batch, num_slots) if ragged else (batch, kv_heads, num_slots)
    expected = {"keys": (*run, head_dim), "values": (*run, head_dim), "slot_bias": run}
    if (log_mass is None) != (state_mean is None):
        raise ValueError("log_mass and state_mean go together: pass both or neither")
    if log_mass is not None:
        expected |= {"log_mass": (batch, kv_heads, num_rows), "state_mean": (batch, kv_heads, num_rows, head_dim)}
    if ragged:
        expected |= {"head_starts": (batch, kv_heads), "head_used": (batch, kv_heads)}
    given = {"keys": keys, "values": values, "slot_bias": slot_bias, "log_mass": log_mass, "state_mean": state_mean,
             "head_starts": head_starts, "head_used": head_used}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(given[name].shape)}, expected {shape} from queries "
                             f"{tuple(queries.shape)} (b, hkv, m, d) and keys' {'T' if ragged else 'S'} = {num_slots}")
    if keys.dtype not in KV_DTYPES or values.dtype != keys.dtype:
        raise ValueError(f"keys and values must share one dtype among bfloat16, float16, float32; "
                         f"got {keys.dtype} and {values.dtype}")
    tensors = [queries, slot_bias] + ([log_mass, state_mean] if log_mass is not None else [])
    for name, tensor in zip(["queries", "slot_bias", "log_mass", "state_mean"], tensors):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    indices = [head_starts, head_used] if ragged else []
    for name, tensor in zip(["head_starts", "head_used"], indices):
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {tensor.dtype}")
    devices = {tensor.device for tensor in [keys, values, *tensors, *indices]}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _head_runs(head_starts, head_used, total_slots: int, max_head_slots: int | None) -> list[list[tuple[int, int]]]:
    """[b][h] -> (start, used) of each head's run, checked to lie inside the T slots (this reads the device)."""
    runs = [list(zip(starts, used)) for starts, used in zip(head_starts.tolist(), head_used.tolist())]
    for b, h in itertools.product(range(len(runs)), range(len(runs[0]) if runs else 0)):
        start, used = runs[b][h]
        if start < 0 or used < 0 or start + used > total_slots:
            raise ValueError(f"head ({b}, {h}) reads slots [{start}, {start + used}): they must lie in "
                             f"[0, {total_slots}), the T slots of keys")
        if max_head_slots is not None and used > max_head_slots:
            raise ValueError(f"head_used[{b}, {h}] = {used} is over max_head_slots = {max_head_slots}")
    return runs


def _takes_triton_path(queries, force_triton) -> bool:
    if force_triton is None:
        force_triton = True if os.environ.get(FORCE_TRITON_ENV) == "1" else None
    if force_triton is False:
        return False
    if force_triton is None:
        return triton is not None and queries.is_cuda
    if triton is None:
        raise RuntimeError("merged_decode_attention: force_triton needs triton, which is not installed")
    if not queries.is_cuda and not _INTERPRETED:
        raise RuntimeError("merged_decode_attention: Triton on CPU tensors needs the interpreter: set "
                           "TRITON_INTERPRET=1 before importing ntkkv.ops.decode_attention")
    return True


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_rows(num_rows: int, head_dim: int, kv_fp32: bool) -> int:
    # tl.dot needs at least 16 rows. Past 16 rows for fp32 (its IEEE dots run on FMAs) and past
    # 8192 accumulator elements for 16-bit caches, ptxas spills registers at 4 warps (sm_90)
    most = 16 if kv_fp32 else min(MAX_BLOCK_ROWS, 8192 // head_dim)
    return min(most, max(16, triton.next_power_of_2(num_rows)))


def _block_slots(head_dim: int, element_size: int) -> int:
    # one K tile plus one V tile of at most 32 KiB, so three pipeline stages fit shared memory
    return min(64, max(16, 16384 // (head_dim * element_size)))


def _split_plan(num_slots, programs_per_split, block_slots, sm_count, num_splits=None,
                typical_slots=None) -> tuple[int, int]:
    """(number of chunks, slots per chunk): chunks of whole tiles over num_slots, enough of them to fill
    the GPU; a given num_splits divides num_slots. A ragged cache (typical_slots: its average head, num_slots
    its longest) cuts its longest head into as many chunks as its average head, or into chunks of
    RAGGED_MIN_CHUNK slots where those are more, and never into chunks shorter than the average head's."""
    if num_splits is not None:
        return _chunks(num_slots, num_splits, block_slots)
    num_splits = triton.cdiv(PROGRAMS_PER_SM * sm_count, programs_per_split)
    if typical_slots is None or typical_slots >= num_slots:
        return _chunks(num_slots, num_splits, block_slots)
    typical_splits, typical_chunk = _chunks(typical_slots, num_splits, block_slots)
    chunk = max(typical_chunk, min(_chunks(num_slots, typical_splits, block_slots)[1], RAGGED_MIN_CHUNK))
    return max(1, triton.cdiv(num_slots, chunk)), chunk


def _chunks(num_slots, num_splits, block_slots) -> tuple[int, int]:
    """num_slots cut into about num_splits chunks of whole tiles: (number of chunks, slots per chunk)."""
    chunk = max(1, triton.cdiv(triton.cdiv(num_slots, num_splits), block_slots)) * block_slots
    return max(1, triton.cdiv(num_slots, chunk)), chunk


def _combine_group(block_rows: int, head_dim: int) -> int:
    # the group's partial sums sit in registers together: at most 8192 floats of them, as _block_rows allows
    return max(1, min(COMBINE_SPLIT_GROUP, 8192 // (block_rows * head_dim)))


def _last_dim_contiguous(tensor):
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _triton_forward(queries, keys, values, slot_bias, scaling, log_mass, state_mean, num_splits, used_slots=None,
                    out_dtype=torch.float32, head_starts=None, head_used=None, max_head_slots=None):
    batch, kv_heads, num_rows, head_dim = queries.shape
    ragged = head_starts is not None
    device = queries.device
    output = torch.empty(batch, kv_heads, num_rows, head_dim, dtype=out_dtype, device=device)
    if output.numel() == 0:
        return output
    queries, keys, values = map(_last_dim_contiguous, (queries, keys, values))
    slot_bias = slot_bias.float()
    has_state = log_mass is not None
    if has_state:
        log_mass, state_mean = log_mass.float(), _last_dim_contiguous(state_mean.float())
    else:  # never read (HAS_STATE is off); any tensor will do for the pointers
        log_mass, state_mean = output, output
    if ragged:
        if max_head_slots is None:
            max_head_slots = max((used for runs in _head_runs(head_starts, head_used, keys.shape[1], None)
                                  for _, used in runs), default=0)
        # the head axis has no stride: a head's run starts at head_starts slots into its sample's run
        num_slots, typical_slots = max_head_slots, triton.cdiv(keys.shape[1], kv_heads)
        key_strides, value_strides = (keys.stride(0), 0, keys.stride(1)), (values.stride(0), 0, values.stride(1))
        bias_strides = (slot_bias.stride(0), 0, slot_bias.stride(1))
        used, starts = head_used.contiguous(), head_starts.contiguous()
    else:
        num_slots, typical_slots = keys.shape[2], None
        key_strides, value_strides, bias_strides = keys.stride()[:3], values.stride()[:3], slot_bias.stride()
        used, starts = output if used_slots is None else used_slots, output  # unread where HAS_USED / RAGGED are off

    kv_fp32 = keys.dtype == torch.float32
    block_m = _block_rows(num_rows, head_dim, kv_fp32)
    block_n = _block_slots(head_dim, keys.element_size())
    row_blocks = triton.cdiv(num_rows, block_m)
    num_splits, chunk = _split_plan(num_slots, batch * kv_heads * row_blocks, block_n, _sm_count(device), num_splits,
                                    typical_slots)
    part_max = torch.empty(batch * kv_heads, num_splits, num_rows, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch * kv_heads, num_splits, num_rows, head_dim, dtype=torch.float32, device=device)

    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _partial_attention[(num_splits, batch * kv_heads, row_blocks)](
            queries, keys, values, slot_bias, used, starts, part_max, part_sum, part_acc,
            scaling * math.log2(math.e), num_rows, num_slots, chunk, num_splits, kv_heads,
            queries.stride(0), queries.stride(1), queries.stride(2), *key_strides, *value_strides, *bias_strides,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
            KV_FP32=kv_fp32, SPLIT_QUERIES=not kv_fp32 and queries.dtype != keys.dtype, INTERPRETED=_INTERPRETED,
            HAS_USED=used_slots is not None, RAGGED=ragged, num_warps=4, num_stages=2 if kv_fp32 else 3,
        )
        _combine_and_merge[(batch * kv_heads, row_blocks)](
            part_max, part_sum, part_acc, log_mass, state_mean, output,
            num_rows, num_splits, kv_heads,
            *log_mass.stride()[:3], *state_mean.stride()[:3],
            BLOCK_M=block_m, HEAD_DIM=head_dim, HAS_STATE=has_state, SPLIT_GROUP=_combine_group(block_m, head_dim),
            num_warps=4,
        )
    return output
