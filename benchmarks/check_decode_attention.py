"""The Triton merged decode attention against its plain-torch composition: accuracy, then speed.

    python benchmarks/check_decode_attention.py                      # CUDA: full grid, then timings
    python benchmarks/check_decode_attention.py --batches 1 --slots 8192 --repeats 200
    python benchmarks/check_decode_attention.py --flex               # and FlexAttention, the other candidate
    python benchmarks/check_decode_attention.py --device cpu --interpret   # tiny run in Triton's interpreter
    python benchmarks/check_decode_attention.py --ragged --batches 1 8 --slots 1024 8192 32768

--ragged times the ragged layout (each KV head its own number of slots, the heads of a sample one
after another in one flat run) against the uniform one holding the same total: uniform (b, hkv, S);
ragged with the total split unevenly (per sample, a floor of 20% of the mean per head and the rest in
Dirichlet(1) shares, fixed seed: how AdaKV's allocations look); ragged split evenly (S per head); and
the uniform kernel over every head padded to the longest (bias -inf), what a ragged cache saves.
Each time is the median µs of one call replayed from a CUDA graph, over enough copies of the cache
(one per call, as layers) that they do not stay in L2. Errors: ragged kernel against the ragged
reference, same bar as above. Nothing else runs in this mode.

--flex times the alternative the decode path could have used: torch's FlexAttention (compiled),
the slot bias as a score_mod, its log-sum-exp merged with the state as the reference merges it; its
largest error against the reference is printed beside its time.

Accuracy: max |triton - reference| / max |reference| per case (NaN only where the reference has
NaN), the reference computed from the same 16-bit tensors; the bar is 1e-5 for fp32 caches and
1e-3 for 16-bit ones. Speed: median milliseconds of --repeats calls after --warmup calls, each
timed with CUDA events (perf_counter on CPU); "GB/s" is the K/V bytes read per second.
"""

import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
STATES = ("none", "some", "empty")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels in Triton's interpreter (CPU tensors; sets TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first (compilation, caches)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--slots", type=int, nargs="+", default=[512, 2048, 8192, 32768], help="kept slots S")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head (one new token: m = group)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="K/V dtype of the timings")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention with the bias as a score_mod")
    parser.add_argument("--split-sweep", action="store_true",
                        help="also time the Triton path at forced split counts, to check the automatic choice")
    parser.add_argument("--ragged", action="store_true",
                        help="only time the ragged layout (uneven and even heads) against the uniform one; check it")
    args = parser.parse_args()
    if args.device == "cpu" and not args.interpret:
        parser.error("--device cpu needs --interpret: compiled Triton kernels run on CUDA only")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --interpret for a tiny check in the interpreter")
    if args.interpret and args.device == "cuda":
        parser.error("--interpret runs on CPU tensors: add --device cpu")
    if args.flex and args.device == "cpu":
        parser.error("--flex needs CUDA: torch.compile does not build FlexAttention's log-sum-exp for the CPU")
    if args.ragged and (args.flex or args.split_sweep):
        parser.error("--ragged is a mode of its own: leave out --flex and --split-sweep")
    return args


def make_case(kv_dtype, head_dim, num_rows, num_slots, state, batch=2, kv_heads=2, device="cuda", seed=0):
    """Random decode inputs, drawn on `device`: a fifth of the slots padding (-inf), a fifth merged
    (log n), every slot of head (1, 0) padding; state "none", "some" (a fifth of log_mass -inf) or
    "empty" (all -inf)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(sampler, *shape):
        return sampler(*shape, generator=generator, device=device)

    slot_bias = torch.zeros(batch, kv_heads, num_slots, device=device)
    slot_bias[draw(torch.rand, batch, kv_heads, num_slots) < 0.2] = -math.inf
    merged = draw(torch.rand, batch, kv_heads, num_slots) < 0.2
    merged_sizes = torch.randint(2, 9, (int(merged.sum()),), generator=generator, device=device)
    slot_bias[merged] = merged_sizes.float().log()
    if batch > 1:
        slot_bias[1, 0] = -math.inf
    case = {
        "queries": (draw(torch.randn, batch, kv_heads, num_rows, head_dim) * 3).to(kv_dtype),
        "keys": draw(torch.randn, batch, kv_heads, num_slots, head_dim).to(kv_dtype),
        "values": draw(torch.randn, batch, kv_heads, num_slots, head_dim).to(kv_dtype),
        "slot_bias": slot_bias,
        "scaling": head_dim**-0.5,
        "log_mass": None,
        "state_mean": None,
    }
    if state != "none":
        log_mass = draw(torch.randn, batch, kv_heads, num_rows) + math.log(num_slots + 1)
        share_empty = 1.0 if state == "empty" else 0.2
        log_mass[draw(torch.rand, batch, kv_heads, num_rows) < share_empty] = -math.inf
        case |= {"log_mass": log_mass, "state_mean": draw(torch.randn, batch, kv_heads, num_rows, head_dim)}
    return case


def relative_error(output, expected):
    """max |output - expected| / max |expected| where expected is not NaN; inf if the NaNs differ."""
    if not torch.equal(output.isnan(), expected.isnan()):
        return math.inf
    real = ~expected.isnan()
    if not real.any():
        return 0.0
    return ((output - expected)[real].abs().max() / expected[real].abs().max().clamp_min(1e-30)).item()


def accuracy_table(fast, reference, device, interpret):
    """One line per (dtype, d, m, S), one error column per state; returns the number of failed cases."""
    dtypes = ["fp32", "bf16"] if interpret else ["fp32", "bf16", "fp16"]
    head_dims = [64] if interpret else [64, 128]
    rows = [1, 3] if interpret else [1, 3, 12]
    slots = [5, 100] if interpret else [1, 5, 100, 1000, 32768]
    print("\n## accuracy: max relative error, Triton vs plain torch\n")
    print("| K/V | d | m | S | " + " | ".join(f"state {state}" for state in STATES) + " | bar | ok |")
    print("|---|---|---|---|" + "---|" * len(STATES) + "---|---|")
    failures = 0
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for head_dim in head_dims:
            for num_rows in rows:
                for num_slots in slots:
                    errors = []
                    for state in STATES:
                        case = make_case(dtype, head_dim, num_rows, num_slots, state, device=device)
                        errors.append(relative_error(fast(**case, force_triton=True), reference(**case)))
                    ok = all(error <= TOLERANCE[dtype] for error in errors)
                    failures += sum(error > TOLERANCE[dtype] for error in errors)
                    cells = " | ".join(f"{error:.1e}" for error in errors)
                    print(f"| {dtype_name} | {head_dim} | {num_rows} | {num_slots} | {cells} | "
                          f"{TOLERANCE[dtype]:.0e} | {'yes' if ok else 'NO'} |")
    return failures


def median_ms(fn, repeats, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_decode(queries, keys, values, slot_bias, scaling, log_mass=None, state_mean=None):
    """The same function through FlexAttention: each KV head's query rows attend over its slots, the slot
    bias added by a score_mod; the log-sum-exp it returns merges with the state."""
    from ntkkv.ops import merge_attention

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + slot_bias[b, h, kv_idx]

    output, lse = compiled_flex_attention()(queries, keys, values, score_mod=add_bias, scale=scaling,
                                            return_lse=True)
    output = output.float()
    if log_mass is None:
        return output
    return merge_attention(lse.float(), output, log_mass.float(), state_mean.float())


def speed_table(fast, reference, args):
    dtype = DTYPES[args.dtype]
    print(f"\n## speed: hkv {args.kv_heads}, group {args.group} (m = {args.group}), d {args.head_dim}, "
          f"{args.dtype} K/V; median of {args.repeats} after {args.warmup} warm-up calls\n")
    flex_header = " flex ms | flex error |" if args.flex else ""
    print("| batch | S | state | torch ms | triton ms | speed-up | triton GB/s | sdpa ms (no state) |" + flex_header)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.flex else ""))
    for batch in args.batches:
        for num_slots in args.slots:
            for state in ("none", "some"):
                case = make_case(dtype, args.head_dim, args.group, num_slots, state, batch=batch,
                                 kv_heads=args.kv_heads, device=args.device)
                time_ms = functools.partial(median_ms, repeats=args.repeats, warmup=args.warmup, device=args.device)
                torch_ms = time_ms(functools.partial(reference, **case))
                triton_ms = time_ms(functools.partial(fast, **case, force_triton=True))
                kv_bytes = case["keys"].numel() * case["keys"].element_size() * 2
                sdpa = "-"
                if state == "none":
                    # the fused library kernel the state-less decode path uses, for scale (its mask in K/V's dtype)
                    sdpa_ms = time_ms(functools.partial(
                        torch.nn.functional.scaled_dot_product_attention, case["queries"], case["keys"],
                        case["values"], attn_mask=case["slot_bias"][:, :, None, :].to(dtype), scale=case["scaling"]))
                    sdpa = f"{sdpa_ms:.3f}"
                flex = ""
                if args.flex:
                    flex_case = {**case, "queries": case["queries"].to(dtype)}  # flex takes one dtype
                    expected = reference(**flex_case)
                    got = flex_decode(**flex_case)
                    finite = torch.isfinite(expected)
                    error = float((got[finite] - expected[finite]).abs().max() / expected[finite].abs().max())
                    flex = f" {time_ms(functools.partial(flex_decode, **flex_case)):.3f} | {error:.1e} |"
                print(f"| {batch} | {num_slots} | {state} | {torch_ms:.3f} | {triton_ms:.3f} | "
                      f"{torch_ms / triton_ms:.1f}x | {kv_bytes / triton_ms / 1e6:.0f} | {sdpa} |" + flex)


def split_sweep_table(fast, args):
    dtype = DTYPES[args.dtype]
    counts = [1, 4, 16, 64, 256]
    print(f"\n## Triton ms by number of chunks over S (auto: the default plan), no state, {args.dtype}\n")
    print("| batch | S | auto | " + " | ".join(map(str, counts)) + " |")
    print("|---|---|---|" + "---|" * len(counts))
    for batch in args.batches:
        for num_slots in args.slots:
            case = make_case(dtype, args.head_dim, args.group, num_slots, "none", batch=batch,
                             kv_heads=args.kv_heads, device=args.device)
            time_ms = functools.partial(median_ms, repeats=args.repeats, warmup=args.warmup, device=args.device)
            cells = [time_ms(functools.partial(fast, **case, force_triton=True, num_splits=count))
                     for count in [None, *counts]]
            print(f"| {batch} | {num_slots} | " + " | ".join(f"{ms:.3f}" for ms in cells) + " |")


def uneven_head_counts(batch, kv_heads, slots_per_head, seed=0, floor_share=0.2):
    """(batch, kv_heads) slot counts, each sample's summing to kv_heads * slots_per_head: every head at least
    floor_share of the mean, the rest shared out in Dirichlet(1) proportions (normalised exponentials)."""
    generator = torch.Generator().manual_seed(seed)
    floor = int(floor_share * slots_per_head)
    rest = kv_heads * (slots_per_head - floor)
    draws = torch.empty(batch, kv_heads, dtype=torch.float64).exponential_(generator=generator)
    shares = draws / draws.sum(1, keepdim=True) * rest
    counts = shares.floor().long()
    # the slots the rounding down left over go to the largest remainders: every sample holds the same total
    leftover = rest - counts.sum(1, keepdim=True)
    order = (shares - counts).argsort(1, descending=True)
    counts.scatter_add_(1, order, (torch.arange(kv_heads)[None] < leftover).long())
    return counts + floor


def flat_starts(counts):
    """Each head's first slot when the heads of a sample lie one after another."""
    return counts.cumsum(1) - counts


def ragged_layouts(dtype, args, batch, slots_per_head, copies):
    """`copies` caches of one flat run of kv_heads * S slots per sample, each read as: uniform (b, hkv, S, d);
    ragged split unevenly; ragged split evenly; and padded (the uneven heads, each padded to the longest)."""
    device, kv_heads, head_dim = args.device, args.kv_heads, args.head_dim
    total = kv_heads * slots_per_head
    counts = uneven_head_counts(batch, kv_heads, slots_per_head)
    even = torch.full((batch, kv_heads), slots_per_head)
    longest = int(counts.max())
    generator = torch.Generator(device=device).manual_seed(1)
    queries = torch.randn(batch, kv_heads, args.group, head_dim, generator=generator, device=device).to(dtype)
    layouts = {"uniform": [], "uneven": [], "even": [], "padded": []}
    for _ in range(copies):
        keys, values = (torch.randn(batch, total, head_dim, generator=generator, device=device).to(dtype)
                        for _ in range(2))
        # a fifth of the slots padding, a fifth standing for 2..8 merged tokens, as make_case draws them
        draw = torch.rand(batch, total, generator=generator, device=device)
        merged_sizes = torch.randint(2, 9, (batch, total), generator=generator, device=device).float()
        bias = torch.where(draw < 0.2, -math.inf, torch.where(draw < 0.4, merged_sizes.log(), 0.0))
        common = {"queries": queries, "scaling": head_dim**-0.5}
        layouts["uniform"].append(common | {"keys": keys.view(batch, kv_heads, slots_per_head, head_dim),
                                            "values": values.view(batch, kv_heads, slots_per_head, head_dim),
                                            "slot_bias": bias.view(batch, kv_heads, slots_per_head)})
        for name, used in (("uneven", counts), ("even", even)):
            layouts[name].append(common | {"keys": keys, "values": values, "slot_bias": bias,
                                           "head_starts": flat_starts(used).to(device), "head_used": used.to(device),
                                           "max_head_slots": int(used.max())})
        padded_keys = keys.new_zeros(batch, kv_heads, longest, head_dim)
        padded_values = torch.zeros_like(padded_keys)
        padded_bias = torch.full((batch, kv_heads, longest), -math.inf, device=device)
        for b, (starts, used) in enumerate(zip(flat_starts(counts).tolist(), counts.tolist())):
            for h, (start, count) in enumerate(zip(starts, used)):
                padded_keys[b, h, :count] = keys[b, start:start + count]
                padded_values[b, h, :count] = values[b, start:start + count]
                padded_bias[b, h, :count] = bias[b, start:start + count]
        layouts["padded"].append(common | {"keys": padded_keys, "values": padded_values, "slot_bias": padded_bias})
    return layouts, longest


def graph_median_us(fast, cases, args):
    """Median µs of one call: on CUDA a graph of one call per case (each case its own memory, as layers are)
    replayed; on CPU the calls one after another."""
    calls = [functools.partial(fast, **case, force_triton=True) for case in cases]

    def run_all():
        for call in calls:
            call()

    if args.device != "cuda":
        return median_ms(run_all, args.repeats, args.warmup, args.device) * 1e3 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture, on a side stream as graphs want
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return median_ms(graph.replay, args.repeats, args.warmup, args.device) * 1e3 / len(calls)


def ragged_table(fast, reference, args):
    """Uniform against ragged (uneven, even) and padded, per (batch, S); returns the number of failed checks."""
    dtype = DTYPES[args.dtype]
    print(f"\n## ragged layout: hkv {args.kv_heads}, group {args.group}, d {args.head_dim}, {args.dtype} K/V, "
          f"no state; median µs of one call over {args.repeats} replays after {args.warmup}\n")
    print("| batch | S per head | longest head | uniform µs | ragged uneven µs | uneven / uniform | "
          "ragged even µs | even / uniform | padded µs | padded / uniform | error uneven | error even |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for batch in args.batches:
        for slots_per_head in args.slots:
            # enough copies that one replay reads more than L2 holds (H200: 60 MB), 32 at most
            cache_bytes = 2 * batch * args.kv_heads * slots_per_head * args.head_dim * dtype.itemsize
            copies = 1 if args.device != "cuda" else max(1, min(32, math.ceil(256e6 / cache_bytes)))
            layouts, longest = ragged_layouts(dtype, args, batch, slots_per_head, copies)
            times = {name: graph_median_us(fast, cases, args) for name, cases in layouts.items()}
            errors = []
            for name in ("uneven", "even"):
                case = layouts[name][0]
                errors.append(relative_error(fast(**case, force_triton=True), reference(**case)))
            failures += sum(error > TOLERANCE[dtype] for error in errors)
            ratios = {name: times[name] / times["uniform"] for name in ("uneven", "even", "padded")}
            print(f"| {batch} | {slots_per_head} | {longest} | {times['uniform']:.1f} | {times['uneven']:.1f} | "
                  f"{ratios['uneven']:.2f} | {times['even']:.1f} | {ratios['even']:.2f} | {times['padded']:.1f} | "
                  f"{ratios['padded']:.2f} | {errors[0]:.1e} | {errors[1]:.1e} |")
            del layouts
    return failures


def main():
    args = parse_args()
    if args.interpret:
        # triton.jit picks the interpreter when the kernels are defined, so before the import
        os.environ["TRITON_INTERPRET"] = "1"
        args.batches, args.slots = args.batches[:1], [min(args.slots[0], 128)]
        args.kv_heads, args.repeats, args.warmup = 2, min(args.repeats, 2), min(args.warmup, 1)
    from ntkkv.ops import decode_attention as merge_triton

    if merge_triton.triton is None:
        sys.exit("triton is not installed")
    fast, reference = merge_triton.merged_decode_attention, merge_triton.merged_decode_attention_reference
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {card}; torch {torch.__version__}, triton {merge_triton.triton.__version__}")
    if args.ragged:
        failures = ragged_table(fast, reference, args)
        print(f"\n{failures} ragged case(s) over the bar {TOLERANCE[DTYPES[args.dtype]]:.0e}")
        sys.exit(1 if failures else 0)
    failures = 0
    if not args.skip_accuracy:
        failures = accuracy_table(fast, reference, args.device, args.interpret)
        print(f"\n{failures} case(s) over the bar")
    if not args.skip_speed:
        speed_table(fast, reference, args)
    if args.split_sweep:
        split_sweep_table(fast, args)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
