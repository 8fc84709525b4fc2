"""The fused kernels of the static decode step against their plain-torch references (which are the eager
modules' own operations), and the whole static decode with them against the dynamic path.

The kernels run on CUDA, or here in Triton's interpreter: `TRITON_INTERPRET=1 python -m pytest
tests/test_decode_step.py` with triton installed (torch's CPU wheels ship none, so CI skips them).
"""

import math

import pytest
import torch

import ntkkv
from ntkkv.ops import decode_attention, decode_step
from ntkkv.ops.decode_step import (
    add_rms_norm,
    add_rms_norm_reference,
    rotary_write,
    rotary_write_reference,
    silu_mul,
    silu_mul_reference,
)
from tiny import random_prompt, tiny_model

INTERPRETER = decode_attention._INTERPRETED
needs_kernels = pytest.mark.skipif(not (INTERPRETER or torch.cuda.is_available()),
                                   reason="needs CUDA, or triton with TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest: bf16 is checked on CUDA only
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the interpreter's bfloat16 rounding is not the GPU's"))]


@pytest.fixture
def kernels(monkeypatch):
    """The fused kernels, on CPU tensors through the interpreter."""
    monkeypatch.setenv(decode_step.FORCE_TRITON_ENV, "1")


def close(fused, reference, dtype):
    """fp32: float rounding apart. bf16: the kernels round where the eager ops do; a sum taken in another
    order can move a value by one bf16 step, rarely."""
    if dtype == torch.float32:
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    else:
        different = (fused.float() - reference.float()).abs() > 1e-2 * reference.float().abs() + 1e-3
        assert different.float().mean() < 0.01


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(kernels, dtype, with_residual):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 96, generator=generator).to(DEVICE, dtype)
    residual = torch.randn(3, 1, 96, generator=generator).to(DEVICE, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(96, generator=generator)).to(DEVICE, dtype)
    out, new_residual = add_rms_norm(x, residual, weight, 1e-5)
    expected, expected_residual = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    close(out, expected, dtype)
    assert torch.equal(new_residual, expected_residual)  # the add rounds once, as the eager add does


def rope(positions, head_dim, dtype):
    frequencies = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.float()[:, None] * frequencies[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_rotates_and_writes_only_its_slot(kernels, dtype):
    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, head_dim, capacity = 2, 6, 2, 64, 10
    queries, keys, values = (torch.randn(batch, count, head_dim, generator=generator).to(DEVICE, dtype)
                             for count in (heads, kv_heads, kv_heads))
    cos, sin = rope(torch.tensor([17, 230]), head_dim, dtype)
    caches = []
    for _ in range(2):
        cache_keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=torch.Generator().manual_seed(2))
        cache_values = torch.randn(cache_keys.shape, generator=torch.Generator().manual_seed(3))
        cache_bias = torch.full((batch, kv_heads, capacity), -math.inf)
        caches.append([cache_keys.to(DEVICE, dtype), cache_values.to(DEVICE, dtype), cache_bias.to(DEVICE)])
    index = torch.tensor([7], device=DEVICE)
    rotated = rotary_write(queries, keys, values, cos, sin, *caches[0], index)
    expected = rotary_write_reference(queries, keys, values, cos, sin, *caches[1], index)
    close(rotated, expected, dtype)
    close(caches[0][0], caches[1][0], dtype)
    for ours, theirs in zip(caches[0][1:], caches[1][1:]):  # values are copied, the bias set: exact
        assert torch.equal(ours, theirs)
    untouched = [slot for slot in range(capacity) if slot != 7]
    assert bool((caches[0][2][:, :, untouched] == -math.inf).all()) and bool((caches[0][2][:, :, 7] == 0).all())


def ragged_cache(batch, total, head_dim, dtype, spare=0):
    """A ragged cache layer (b, T, d) of random keys and values, every slot's bias -inf; with `spare`, the
    first T slots of a wider buffer (b, T + spare, d), as the static cache holds it (a view)."""
    cache_keys = torch.randn(batch, total + spare, head_dim, generator=torch.Generator().manual_seed(2))
    cache_values = torch.randn(cache_keys.shape, generator=torch.Generator().manual_seed(3))
    layer = [cache_keys.to(DEVICE, dtype), cache_values.to(DEVICE, dtype),
             torch.full((batch, total + spare), -math.inf, device=DEVICE)]
    return [tensor[:, :total] for tensor in layer]


@pytest.mark.parametrize("spare", [0, 1])  # 1: the layer is a view of a wider buffer, as the static cache's
@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_ragged_writes_each_heads_own_slot(monkeypatch, use_kernels, dtype, spare):
    """Ragged cache (b, T, d): each KV head writes its rotated key and its value at its own slot of its
    sample's flat run, as a hand-written loop does; nothing else of the cache changes. The kernel takes
    the view of a wider buffer too (rows spaced wider than they are long), without falling back."""
    if use_kernels:
        monkeypatch.setenv(decode_step.FORCE_TRITON_ENV, "1")

        def no_fallback(*args):
            raise AssertionError("the kernel fell back to the reference")
        monkeypatch.setattr(decode_step, "rotary_write_reference", no_fallback)
    generator = torch.Generator().manual_seed(6)
    batch, heads, kv_heads, head_dim, total = 2, 6, 3, 64, 40
    queries, keys, values = (torch.randn(batch, count, head_dim, generator=generator).to(DEVICE, dtype)
                             for count in (heads, kv_heads, kv_heads))
    cos, sin = rope(torch.tensor([17, 230]), head_dim, dtype)
    write_index = torch.tensor([[4, 11, 39], [0, 25, 26]], dtype=torch.int32, device=DEVICE)
    cache = ragged_cache(batch, total, head_dim, dtype, spare)
    rotated = rotary_write(queries, keys, values, cos, sin, *cache, write_index)
    if spare:  # the column past the view is untouched
        untouched = ragged_cache(batch, total, head_dim, dtype, spare)
        for ours, theirs in zip(cache, untouched):
            assert torch.equal(ours.as_strided(ours.shape[:1] + (spare,) + ours.shape[2:], ours.stride(),
                                               ours.storage_offset() + total * ours.stride(1)),
                               theirs.as_strided(theirs.shape[:1] + (spare,) + theirs.shape[2:], theirs.stride(),
                                                 theirs.storage_offset() + total * theirs.stride(1)))

    # by hand: the keys rotated as the uniform layer's reference rotates them, then copied slot by slot
    uniform = [torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype, device=DEVICE),
               torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype, device=DEVICE),
               torch.zeros(batch, kv_heads, 1, device=DEVICE)]
    expected_queries = rotary_write_reference(queries, keys, values, cos, sin, *uniform,
                                              torch.tensor([0], device=DEVICE))
    expected = ragged_cache(batch, total, head_dim, dtype, spare)
    for b in range(batch):
        for h in range(kv_heads):
            slot = int(write_index[b, h])
            expected[0][b, slot], expected[1][b, slot], expected[2][b, slot] = uniform[0][b, h, 0], values[b, h], 0.0
    close(rotated, expected_queries, dtype)
    close(cache[0], expected[0], dtype)
    for ours, theirs in zip(cache[1:], expected[1:]):  # values are copied, the bias set: exact
        assert torch.equal(ours, theirs)
    assert int((cache[2] == 0).sum()) == batch * kv_heads

    reference_cache = ragged_cache(batch, total, head_dim, dtype, spare)
    reference_queries = rotary_write_reference(queries, keys, values, cos, sin, *reference_cache, write_index.long())
    close(rotated, reference_queries, dtype)
    close(cache[0], reference_cache[0], dtype)
    for ours, theirs in zip(cache[1:], reference_cache[1:]):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache_dims, index_shape, message", [
    (3, (1,), r"ragged cache layer \(b, T, d\) takes write_index \(b, kv_heads\) = \(2, 3\)"),
    (3, (3, 2), r"ragged cache layer .* got \(3, 2\)"),
    (4, (2, 3), "uniform cache layer .* one-element write_index"),
])
def test_rotary_write_refuses_a_write_index_of_the_other_layout(cache_dims, index_shape, message):
    queries, keys = torch.zeros(2, 6, 32), torch.zeros(2, 3, 32)
    cos, sin = torch.ones(2, 32), torch.zeros(2, 32)
    shape = (2, 10) if cache_dims == 3 else (2, 3, 10)
    cache = [torch.zeros(*shape, 32), torch.zeros(*shape, 32), torch.zeros(shape)]
    with pytest.raises(ValueError, match=message):
        rotary_write(queries, keys, keys, cos, sin, *cache, torch.zeros(index_shape, dtype=torch.long))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(kernels, dtype):
    generator = torch.Generator().manual_seed(4)
    gate, up = (torch.randn(3, 1, 1500, generator=generator).to(DEVICE, dtype) for _ in range(2))
    close(silu_mul(gate, up), silu_mul_reference(gate, up), dtype)


@needs_kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_decode_attention_reads_no_slot_past_the_used_ones():
    """Slots from `used_slots` on hold NaN here: the kernel must not read them (the reference, which reads
    every slot, gets them masked by their -inf bias instead)."""
    generator = torch.Generator().manual_seed(5)
    batch, kv_heads, rows, slots, head_dim = 2, 2, 3, 70, 64
    queries = torch.randn(batch, kv_heads, rows, head_dim, generator=generator).to(DEVICE)
    keys = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(DEVICE)
    values = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(DEVICE)
    bias = torch.zeros(batch, kv_heads, slots, device=DEVICE)
    used = torch.tensor([41], device=DEVICE)
    bias[:, :, 41:] = -math.inf
    expected = decode_attention.merged_decode_attention_reference(queries, keys[:, :, :41], values[:, :, :41],
                                                                  bias[:, :, :41], 0.125)
    keys[:, :, 41:], values[:, :, 41:] = math.nan, math.nan
    output = decode_attention.merged_decode_attention(queries, keys, values, bias, 0.125, force_triton=True,
                                                      used_slots=used, out_dtype=torch.bfloat16, num_splits=4)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected.float(), rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("method, options", [("snapkv", {}), ("pyramidkv", {"summary": "merge", "state_budget": 0.25,
                                                                             "ratchet": 2})])
def test_static_decode_with_the_fused_kernels_equals_the_dynamic_path(kernels, method, options):
    model = tiny_model().to(DEVICE)
    prompt = random_prompt(90, batch=2, seed=3).to(DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :30] = 0
    generate = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with ntkkv.compress(model, method, max_capacity_prompt=32, **options):
        dynamic = ntkkv.generate(model, prompt, mask, decode="dynamic", **generate)
        static = ntkkv.generate(model, prompt, mask, decode="static", cuda_graph=False, **generate)
    assert static.new_tokens == dynamic.new_tokens
    for ours, theirs in zip(static.output.logits, dynamic.output.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
