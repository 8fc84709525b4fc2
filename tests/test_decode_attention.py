"""The decode-time merged attention: its plain-torch composition against a slow loop, the input
checks and the CPU fallback; the Triton kernels against the composition on CUDA, and on CPU
when triton runs under TRITON_INTERPRET=1 (set before pytest starts).
"""

import functools
import math

import pytest
import torch

from ntkkv.ops import decode_attention as merge_triton
from ntkkv.ops.decode_attention import (
    merged_decode_attention,
    merged_decode_attention_reference,
)

INTERPRETER = merge_triton._INTERPRETED
KV_DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
STATES = ["none", "some", "empty"]


def make_case(kv_dtype=torch.float32, head_dim=64, num_rows=3, num_slots=100, state="some", query_dtype=None,
              batch=2, kv_heads=2, device="cpu", seed=0):
    """Random decode inputs as keyword arguments. About a fifth of the slots are padding (-inf) and a
    fifth stand for 2..8 merged tokens (log n); every slot of head (1, 0) is padding. state: "none",
    "some" (a log_mass per row, a few of them -inf) or "empty" (every log_mass -inf)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    slot_bias = torch.zeros(batch, kv_heads, num_slots)
    slot_bias[torch.rand(batch, kv_heads, num_slots, generator=generator) < 0.2] = -math.inf
    merged = torch.rand(batch, kv_heads, num_slots, generator=generator) < 0.2
    slot_bias[merged] = torch.randint(2, 9, (int(merged.sum()),), generator=generator).float().log()
    if batch > 1:
        slot_bias[1, 0] = -math.inf
    case = {
        "queries": (randn(batch, kv_heads, num_rows, head_dim) * 3).to(query_dtype or kv_dtype),
        "keys": randn(batch, kv_heads, num_slots, head_dim).to(kv_dtype),
        "values": randn(batch, kv_heads, num_slots, head_dim).to(kv_dtype),
        "slot_bias": slot_bias,
        "scaling": head_dim**-0.5,
        "log_mass": None,
        "state_mean": None,
    }
    if state != "none":
        # around log S: the state weighs about as much as the kept slots
        log_mass = randn(batch, kv_heads, num_rows) + math.log(num_slots + 1)
        emptied = torch.rand(batch, kv_heads, num_rows, generator=generator) < (1.0 if state == "empty" else 0.2)
        log_mass[emptied] = -math.inf
        case |= {"log_mass": log_mass, "state_mean": randn(batch, kv_heads, num_rows, head_dim)}
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in case.items()}


def slow_merged_attention(queries, keys, values, slot_bias, scaling, log_mass, state_mean):
    """One (batch, head, row) at a time in float64, the state taken as one more slot whose logit is
    log_mass and whose value is state_mean. A row with no weight at all is 0 without a state and NaN
    with one (what merge_attention's 0/0 gives)."""
    batch, kv_heads, num_rows, head_dim = queries.shape
    output = torch.zeros(batch, kv_heads, num_rows, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            for row in range(num_rows):
                logits = [float(queries[b, h, row].double() @ keys[b, h, slot].double()) * scaling
                          + float(slot_bias[b, h, slot]) for slot in range(keys.shape[2])]
                row_values = [values[b, h, slot].double() for slot in range(keys.shape[2])]
                if log_mass is not None:
                    logits.append(float(log_mass[b, h, row]))
                    row_values.append(state_mean[b, h, row].double())
                top = max(logits, default=-math.inf)
                if top == -math.inf:
                    output[b, h, row] = math.nan if log_mass is not None else 0.0
                    continue
                weights = [math.exp(logit - top) for logit in logits]
                output[b, h, row] = sum(w * v for w, v in zip(weights, row_values)) / sum(weights)
    return output


def relative_error(output, expected):
    """max |output - expected| / max |expected| over the entries expected is not NaN at; NaNs must match."""
    assert torch.equal(output.isnan(), expected.isnan()), "NaN in different places"
    real = ~expected.isnan()
    if not real.any():
        return 0.0
    expected = expected.to(output.dtype)
    return ((output - expected)[real].abs().max() / expected[real].abs().max().clamp_min(1e-30)).item()


# --- the plain-torch composition, checked against the slow loop -----------------------------


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("num_rows", [1, 3, 12])
@pytest.mark.parametrize("num_slots", [1, 5, 100])
def test_reference_equals_slow_loop(kv_dtype, state, num_rows, num_slots):
    case = make_case(kv_dtype, 16, num_rows, num_slots, state)
    output = merged_decode_attention_reference(**case)
    assert output.dtype == torch.float32 and output.shape == case["queries"].shape
    assert relative_error(output, slow_merged_attention(**case)) < 1e-5


def test_reference_edge_rows_by_hand():
    case = make_case(torch.float32, 16, 2, 7, "some")
    case["log_mass"][1, 0] = 0.0
    with_state = merged_decode_attention_reference(**case)
    # head (1, 0) keeps only padding: its output is the state's mean where the state has weight
    torch.testing.assert_close(with_state[1, 0], case["state_mean"][1, 0])
    without_state = merged_decode_attention_reference(**(case | {"log_mass": None, "state_mean": None}))
    assert torch.equal(without_state[1, 0], torch.zeros_like(without_state[1, 0]))
    empty_state = case | {"log_mass": torch.full_like(case["log_mass"], -math.inf)}
    merged_with_nothing = merged_decode_attention_reference(**empty_state)
    torch.testing.assert_close(merged_with_nothing[0], without_state[0], rtol=0, atol=0)
    assert merged_with_nothing[1, 0].isnan().all()  # no slot and no state: 0/0, as merge_attention


# --- inputs the function refuses ------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [8, 96, 512])
def test_an_unsupported_head_dim_takes_the_reference_unless_triton_is_forced(head_dim):
    case = make_case(head_dim=head_dim, num_slots=4)
    torch.testing.assert_close(merged_decode_attention(**case), merged_decode_attention_reference(**case),
                               equal_nan=True)  # a row with every slot masked and an empty state is NaN in both
    with pytest.raises(ValueError, match=rf"head_dim {head_dim} is not supported by the Triton kernels.*16, 32, 64"):
        merged_decode_attention(**case, force_triton=True)


@pytest.mark.parametrize("change, message", [
    (lambda c: c | {"queries": c["queries"][0]}, "queries must be a 4-d tensor"),
    (lambda c: c | {"values": c["values"][:, :, :-1]}, "values has shape"),
    (lambda c: c | {"keys": c["keys"][..., :32]}, "keys has shape"),
    (lambda c: c | {"slot_bias": c["slot_bias"][:, :1]}, "slot_bias has shape"),
    (lambda c: c | {"slot_bias": c["slot_bias"][:, :, None]}, "slot_bias must be a 3-d tensor"),
    (lambda c: c | {"state_mean": None}, "log_mass and state_mean go together"),
    (lambda c: c | {"log_mass": c["log_mass"][..., :1]}, "log_mass has shape"),
    (lambda c: c | {"state_mean": c["state_mean"][:, :, :, :8]}, "state_mean has shape"),
    (lambda c: c | {"values": c["values"].half()}, "share one dtype"),
    (lambda c: c | {"keys": c["keys"].double(), "values": c["values"].double()}, "share one dtype"),
    (lambda c: c | {"slot_bias": c["slot_bias"].isfinite()}, "slot_bias must be a floating-point"),
    (lambda c: c | {"queries": c["queries"].long()}, "queries must be a floating-point"),
])
def test_bad_inputs_raise(change, message):
    case = change(make_case(num_slots=6))
    with pytest.raises(ValueError, match=message):
        merged_decode_attention(**case)
    with pytest.raises(ValueError, match=message):
        merged_decode_attention_reference(**case)


def test_bad_split_count_raises():
    with pytest.raises(ValueError, match="num_splits"):
        merged_decode_attention(**make_case(num_slots=6), num_splits=0)


# --- the CPU fallback -----------------------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
def test_cpu_tensors_fall_back_to_the_reference(state):
    case = make_case(torch.bfloat16, 64, 4, 50, state)
    expected = merged_decode_attention_reference(**case)
    for force_triton in (None, False):
        output = merged_decode_attention(**case, force_triton=force_triton)
        torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)


def test_forcing_triton_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(merge_triton, "triton", None)
    with pytest.raises(RuntimeError, match="not installed"):
        merged_decode_attention(**make_case(num_slots=6), force_triton=True)
    monkeypatch.setenv(merge_triton.FORCE_TRITON_ENV, "1")  # the environment's way to ask for it
    with pytest.raises(RuntimeError, match="not installed"):
        merged_decode_attention(**make_case(num_slots=6))


def test_forcing_triton_on_cpu_outside_the_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(merge_triton, "triton", object())
    monkeypatch.setattr(merge_triton, "_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        merged_decode_attention(**make_case(num_slots=6), force_triton=True)


# --- the Triton kernels against the composition -----------------------------------------------


def check_triton_grid(device, kv_dtype, state):
    """Every (head_dim, rows, slots) of the grid; the failures, listed together."""
    failures = []
    for head_dim in (64, 128):
        for num_rows in (1, 3, 12):
            for num_slots in (1, 5, 100, 1000):
                case = make_case(kv_dtype, head_dim, num_rows, num_slots, state, device=device)
                error = relative_error(merged_decode_attention(**case, force_triton=True),
                                       merged_decode_attention_reference(**case))
                if not error <= TOLERANCE[kv_dtype]:
                    failures.append(f"d={head_dim} m={num_rows} S={num_slots}: {error:.2e}")
    assert not failures, failures


def check_triton_extras(device):
    """Cases off the grid: mixed query/cache dtypes, fp16, >64 rows (several row blocks), no slots,
    views into a longer cache, forced split counts, d at the ends of the range."""
    cases = [  # (cache dtype, make_case arguments, num_splits)
        (torch.bfloat16, {"query_dtype": torch.float32, "num_rows": 4, "num_slots": 300}, None),
        (torch.float32, {"query_dtype": torch.bfloat16, "num_rows": 4, "num_slots": 300}, None),
        (torch.float16, {"num_rows": 5, "num_slots": 200}, None),
        (torch.float16, {"query_dtype": torch.float32, "num_rows": 5, "num_slots": 200, "state": "none"}, None),
        (torch.bfloat16, {"num_rows": 80, "num_slots": 70}, None),
        (torch.float32, {"num_slots": 0}, None),
        (torch.float32, {"num_slots": 0, "state": "none"}, None),
        (torch.float32, {"num_rows": 0}, None),
        (torch.float32, {"head_dim": 16, "num_slots": 40}, None),
        (torch.bfloat16, {"head_dim": 256, "num_slots": 90}, None),
        (torch.float32, {"num_slots": 333}, 1),
        (torch.bfloat16, {"num_slots": 333}, 3),
        (torch.bfloat16, {"num_slots": 333}, 1000),
    ]
    failures = []
    for kv_dtype, build, num_splits in cases:
        case = make_case(kv_dtype, device=device, **build)
        error = relative_error(merged_decode_attention(**case, force_triton=True, num_splits=num_splits),
                               merged_decode_attention_reference(**case))
        if not error <= TOLERANCE[kv_dtype]:
            failures.append(f"{kv_dtype} {build} num_splits={num_splits}: {error:.2e}")
    # keys and values as views of a longer cache buffer, the bias every other float of a buffer
    case = make_case(torch.bfloat16, 64, 4, 120, device=device)
    cache = torch.zeros(2, 2, 200, 64, dtype=torch.bfloat16, device=device)
    interleaved_bias = torch.zeros(2, 2, 120, 2, device=device)
    views = case | {"keys": cache.clone()[:, :, :120], "values": cache.clone()[:, :, :120],
                    "slot_bias": interleaved_bias[..., 0]}
    views["keys"].copy_(case["keys"])
    views["values"].copy_(case["values"])
    views["slot_bias"].copy_(case["slot_bias"])
    error = relative_error(merged_decode_attention(**views, force_triton=True),
                           merged_decode_attention_reference(**case))
    if not error <= TOLERANCE[torch.bfloat16]:
        failures.append(f"views: {error:.2e}")
    assert not failures, failures


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or merge_triton.triton is None,
                                reason="needs CUDA and triton")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs triton with TRITON_INTERPRET=1")


def quiet_numpy(test):
    """The interpreter's numpy warns of log2(0) and 0/0 on rows masked off or empty, and (numpy >= 1.25)
    of its own 1-element arrays taken as loop bounds."""
    test = pytest.mark.filterwarnings("ignore::RuntimeWarning")(test)
    return pytest.mark.filterwarnings("ignore::DeprecationWarning")(test)


@needs_cuda
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("state", STATES)
def test_triton_matches_reference_on_cuda(kv_dtype, state):
    check_triton_grid("cuda", kv_dtype, state)


@needs_cuda
def test_triton_extras_on_cuda():
    check_triton_extras("cuda")


@needs_cuda
def test_triton_long_cache_on_cuda():
    case = make_case(torch.bfloat16, 128, 4, 32768, batch=1, kv_heads=8, device="cuda")
    error = relative_error(merged_decode_attention(**case), merged_decode_attention_reference(**case))
    assert error <= TOLERANCE[torch.bfloat16]


@needs_interpreter
@quiet_numpy
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("state", STATES)
def test_triton_matches_reference_in_interpreter(kv_dtype, state):
    check_triton_grid("cpu", kv_dtype, state)


@needs_interpreter
@quiet_numpy
def test_triton_extras_in_interpreter():
    check_triton_extras("cpu")


# --- the ragged layout: heads of one sample one after another in a flat run, each its own count -----


def make_ragged_case(kv_dtype, used, num_rows=4, head_dim=32, state="some", room=3, query_dtype=None,
                     index_dtype=torch.int64, device="cpu", seed=0):
    """Keyword arguments of a ragged decode case: head h of sample b holds used[b][h] slots, the heads of a
    sample one after another in one flat run (b, T, d) with `room` unwritten slots before every head's run
    and after the last. The unwritten slots hold NaN keys, values and bias: reading one would show. Inside
    the runs a fifth of the slots are padding (-inf) and a fifth stand for 2..8 merged tokens (log n)."""
    generator = torch.Generator().manual_seed(seed)
    head_used = torch.tensor(used)
    batch, kv_heads = head_used.shape
    head_starts = (head_used + room).cumsum(1) - head_used
    total = int((head_used + room).sum(1).max()) + room
    keys = torch.full((batch, total, head_dim), math.nan)
    values = torch.full((batch, total, head_dim), math.nan)
    slot_bias = torch.full((batch, total), math.nan)
    for b in range(batch):
        for h in range(kv_heads):
            start, count = int(head_starts[b, h]), int(head_used[b, h])
            run = slice(start, start + count)
            keys[b, run] = torch.randn(count, head_dim, generator=generator)
            values[b, run] = torch.randn(count, head_dim, generator=generator)
            draw = torch.rand(count, generator=generator)
            merged_sizes = torch.randint(2, 9, (count,), generator=generator).float()
            slot_bias[b, run] = torch.where(draw < 0.2, -math.inf, torch.where(draw < 0.4, merged_sizes.log(), 0.0))
    queries = torch.randn(batch, kv_heads, num_rows, head_dim, generator=generator) * 3
    case = {
        "queries": queries.to(query_dtype or kv_dtype),
        "keys": keys.to(kv_dtype),
        "values": values.to(kv_dtype),
        "slot_bias": slot_bias,
        "scaling": head_dim**-0.5,
        "log_mass": None,
        "state_mean": None,
        "head_starts": head_starts.to(index_dtype),
        "head_used": head_used.to(index_dtype),
    }
    if state != "none":
        log_mass = torch.randn(batch, kv_heads, num_rows, generator=generator) + math.log(head_used.float().mean() + 1)
        emptied = torch.rand(batch, kv_heads, num_rows, generator=generator) < (1.0 if state == "empty" else 0.2)
        log_mass[emptied] = -math.inf
        case |= {"log_mass": log_mass, "state_mean": torch.randn(batch, kv_heads, num_rows, head_dim,
                                                                  generator=generator)}
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in case.items()}


def padded_and_masked(case):
    """The ragged case as a uniform one: every head's run copied to the front of (b, hkv, S, d), S the
    longest run, and the rest padded with zeros of bias -inf."""
    head_starts, head_used = case["head_starts"].tolist(), case["head_used"].tolist()
    keys = case["keys"]
    batch, kv_heads, longest = len(head_used), len(head_used[0]), max(max(row) for row in head_used)
    padded_keys = keys.new_zeros(batch, kv_heads, longest, keys.shape[-1])
    padded_values = torch.zeros_like(padded_keys)
    padded_bias = torch.full((batch, kv_heads, longest), -math.inf, device=keys.device)
    for b in range(batch):
        for h in range(kv_heads):
            start, count = head_starts[b][h], head_used[b][h]
            padded_keys[b, h, :count] = keys[b, start:start + count]
            padded_values[b, h, :count] = case["values"][b, start:start + count]
            padded_bias[b, h, :count] = case["slot_bias"][b, start:start + count]
    uniform = {name: value for name, value in case.items() if name not in ("head_starts", "head_used")}
    return uniform | {"keys": padded_keys, "values": padded_values, "slot_bias": padded_bias}


# uneven heads, heads with no slot, a sample all of whose heads are empty
RAGGED_USED = [[[5, 0, 90, 17], [1, 33, 0, 2]], [[120, 1, 3]], [[0, 0], [0, 4]]]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("used", RAGGED_USED)
def test_ragged_reference_equals_padded_and_masked(kv_dtype, state, used):
    """A ragged cache gives the outputs of a padded-and-masked one, which the uniform tests check against the
    slow loop; a head with no slot gives 0 without a state and the state's mean with one."""
    case = make_ragged_case(kv_dtype, used, state=state)
    output = merged_decode_attention_reference(**case)
    assert output.dtype == torch.float32 and output.shape == case["queries"].shape
    assert relative_error(output, merged_decode_attention_reference(**padded_and_masked(case))) < 1e-6
    assert relative_error(output, slow_merged_attention(**padded_and_masked(case))) < 1e-5
    empty = case["head_used"] == 0
    if state == "none":
        assert torch.equal(output[empty], torch.zeros_like(output[empty]))
    elif state == "some":
        weighted = empty[:, :, None] & case["log_mass"].isfinite()
        torch.testing.assert_close(output[weighted], case["state_mean"][weighted])


def test_ragged_cpu_tensors_fall_back_to_the_reference():
    case = make_ragged_case(torch.bfloat16, RAGGED_USED[0])
    expected = merged_decode_attention_reference(**case)
    for force_triton in (None, False):
        output = merged_decode_attention(**case, force_triton=force_triton, max_head_slots=90, out_dtype=torch.float16)
        assert output.dtype == torch.float16
        torch.testing.assert_close(output, expected.half(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("change, message", [
    (lambda c: c | {"head_used": None}, "head_starts and head_used go together"),
    (lambda c: c | {"keys": c["keys"][:, None]}, r"keys must be a 3-d tensor \(the ragged layout"),
    (lambda c: c | {"slot_bias": c["slot_bias"][:, None]}, "slot_bias must be a 2-d tensor"),
    (lambda c: c | {"values": c["values"][:, :-1]}, "values has shape"),
    (lambda c: c | {"slot_bias": c["slot_bias"][:, 1:]}, r"slot_bias has shape .* keys' T = "),
    (lambda c: c | {"head_used": c["head_used"][:, :1]}, "head_used has shape"),
    (lambda c: c | {"head_starts": c["head_starts"][None]}, "head_starts has shape"),
    (lambda c: c | {"head_starts": c["head_starts"].float()}, "head_starts must be an int32 or int64 tensor"),
    (lambda c: c | {"head_used": c["head_used"].short()}, "head_used must be an int32 or int64 tensor"),
    (lambda c: c | {"head_used": c["head_used"] + 200}, r"head \(0, 0\) reads slots \[3, 208\): .* \[0, 127\)"),
    (lambda c: c | {"head_starts": c["head_starts"] - 4}, r"head \(0, 0\) reads slots \[-1, 4\)"),
    (lambda c: c | {"max_head_slots": 89}, r"head_used\[0, 2\] = 90 is over max_head_slots = 89"),
])
def test_ragged_bad_inputs_raise(change, message):
    case = change(make_ragged_case(torch.float32, RAGGED_USED[0]))
    with pytest.raises(ValueError, match=message):
        merged_decode_attention(**case)
    with pytest.raises(ValueError, match=message):
        merged_decode_attention_reference(**case)


@pytest.mark.parametrize("extra, message", [
    ({"used_slots": torch.tensor([4])}, "used_slots is for the uniform layout"),
    ({"max_head_slots": -1}, "max_head_slots must be a non-negative int, got -1"),
    ({"max_head_slots": 90.0}, "max_head_slots must be a non-negative int, got 90.0"),
])
def test_ragged_bad_options_raise(extra, message):
    with pytest.raises(ValueError, match=message):
        merged_decode_attention(**make_ragged_case(torch.float32, RAGGED_USED[0]), **extra)


def test_max_head_slots_without_the_ragged_layout_raises():
    with pytest.raises(ValueError, match="max_head_slots is for the ragged layout"):
        merged_decode_attention(**make_case(num_slots=6), max_head_slots=6)


def check_ragged_triton(device, kv_dtype, state):
    """The ragged kernels against the ragged reference over uneven heads, empty heads, query rows of a group,
    forced and automatic split counts, a loose and no max_head_slots; the failures, listed together."""
    cases = [  # (used per head, make_ragged_case arguments, merged_decode_attention arguments)
        (RAGGED_USED[0], {}, {}),
        (RAGGED_USED[0], {"num_rows": 12, "index_dtype": torch.int32}, {"max_head_slots": 90}),
        (RAGGED_USED[1], {"num_rows": 1}, {"num_splits": 1, "max_head_slots": 120}),
        (RAGGED_USED[1], {}, {"num_splits": 3}),  # the short heads' later chunks read nothing
        (RAGGED_USED[1], {"room": 0}, {"num_splits": 1000, "max_head_slots": 500}),
        (RAGGED_USED[2], {}, {}),
        ([[3, 150, 0, 7, 1, 40, 0, 2]], {"head_dim": 64, "query_dtype": torch.float32}, {"max_head_slots": 150}),
    ]
    failures = []
    for used, build, options in cases:
        case = make_ragged_case(kv_dtype, used, state=state, device=device, **build)
        output = merged_decode_attention(**case, force_triton=True, **options)
        error = relative_error(output, merged_decode_attention_reference(**case))
        if not error <= TOLERANCE[kv_dtype]:
            failures.append(f"{used} {build} {options}: {error:.2e}")
    assert not failures, failures


@needs_cuda
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state", STATES)
def test_ragged_triton_matches_reference_on_cuda(kv_dtype, state):
    check_ragged_triton("cuda", kv_dtype, state)


@needs_cuda
def test_ragged_triton_long_uneven_cache_on_cuda():
    """Llama-3-8B's decode shape, 8 KV heads of 32768 slots on average split unevenly, against padding."""
    exponentials = -torch.rand(2, 8, generator=torch.Generator().manual_seed(0)).log()  # normalised: Dirichlet(1)
    shares = exponentials / exponentials.sum(1, keepdim=True) * 0.8 + 0.2 / 8
    used = (shares * 8 * 32768).long().tolist()
    case = make_ragged_case(torch.bfloat16, used, num_rows=4, head_dim=128, device="cuda")
    output = merged_decode_attention(**case, max_head_slots=max(map(max, used)))
    assert relative_error(output, merged_decode_attention_reference(**padded_and_masked(case))) <= 1e-3


@needs_cuda
def test_ragged_call_replays_in_a_cuda_graph():
    """With max_head_slots given the ragged call waits for nothing on the host: it captures in a CUDA graph,
    and a replay reads the head counts and starts written into the same tensors since."""
    case = make_ragged_case(torch.bfloat16, RAGGED_USED[0], head_dim=128, device="cuda")
    call = functools.partial(merged_decode_attention, **case, max_head_slots=100)
    call()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    moved = make_ragged_case(torch.bfloat16, [[80, 2, 0, 30], [0, 0, 7, 60]], head_dim=128, room=0, device="cuda")
    for name in ("head_starts", "head_used"):
        case[name].copy_(moved[name])
    for name in ("keys", "values", "slot_bias"):
        case[name][:, :moved[name].shape[1]].copy_(moved[name])
    graph.replay()
    assert relative_error(output, merged_decode_attention_reference(**case)) <= TOLERANCE[torch.bfloat16]


@needs_interpreter
@quiet_numpy
@pytest.mark.parametrize("kv_dtype, state", [(torch.float32, state) for state in STATES]
                         + [(torch.bfloat16, "none"), (torch.bfloat16, "some"), (torch.float16, "some")])
def test_ragged_triton_matches_reference_in_interpreter(kv_dtype, state):
    check_ragged_triton("cpu", kv_dtype, state)


@pytest.mark.skipif(merge_triton.triton is None, reason="needs triton")
@pytest.mark.parametrize("longest, average, programs_per_split", [(2274, 1024, 8), (72719, 32768, 8), (4244, 1024, 64),
                                                                  (135694, 32768, 64), (5, 3, 8), (0, 0, 8)])
def test_ragged_split_plan_covers_the_longest_head_in_whole_tiles(longest, average, programs_per_split):
    """The longest head is covered by whole tiles, in chunks no shorter than the average head's, and in no
    more chunks than the average head's unless those chunks are RAGGED_MIN_CHUNK slots or more."""
    sm_count, tile = 132, 64
    splits, chunk = merge_triton._split_plan(longest, programs_per_split, tile, sm_count, typical_slots=average)
    average_splits, average_chunk = merge_triton._split_plan(average, programs_per_split, tile, sm_count)
    assert chunk % tile == 0 and splits * chunk >= longest and (splits - 1) * chunk < max(longest, 1)
    assert chunk >= average_chunk
    assert splits <= average_splits or chunk >= merge_triton.RAGGED_MIN_CHUNK


@needs_interpreter
@quiet_numpy
def test_combine_folds_chunks_in_groups_bit_for_bit(monkeypatch):
    """The combine's loads in groups change nothing: one chunk at a time gives the same bits (7 chunks: the
    last group runs past the end)."""
    case = make_case(torch.bfloat16, 64, 3, 400)
    grouped = merged_decode_attention(**case, force_triton=True, num_splits=7)
    monkeypatch.setattr(merge_triton, "COMBINE_SPLIT_GROUP", 1)
    one_at_a_time = merged_decode_attention(**case, force_triton=True, num_splits=7)
    assert torch.equal(grouped.isnan(), one_at_a_time.isnan())
    assert torch.equal(grouped.nan_to_num(), one_at_a_time.nan_to_num())
