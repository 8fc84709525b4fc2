"""Speed and memory of each method on a Llama-3-8B-shaped model with random weights.

    python benchmarks/bench_speed.py --out docs/bench_speed.md                 # GPU: 8k and 32k prompts
    python benchmarks/bench_speed.py --lengths 8192,32768,65536 --repeats 5 --out docs/bench_speed.md
    python benchmarks/bench_speed.py --device cpu --tiny                        # smoke test, seconds

For each prompt length and method (FullKV and each compressing method at --budget), after one
warm-up run per cell, the median over --repeats of:
  prefill      one forward pass over the prompt into a fresh DynamicCache (logits of the last token only);
  decode       ms per token over --decode-steps greedy steps, one token per forward pass,
               positions taken from the cache's length;
  peak memory  the most memory allocated during prefill + decode, above what the weights take;
  KV/layer     K/V entries each layer held after the prefill (mean over layers; min-max if they differ).
A cell that runs out of GPU memory reads "OOM" and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import ntkkv
from ntkkv.generation import cache_argument_name
from ntkkv.policies import canonical_name

LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=131072,
)
# same shape family, small enough for a CPU smoke test
TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=4096,
)
GIB = 1024**3


@dataclass
class Cell:
    """Medians over the repeats of one (prompt length, method); `error` set when it failed."""

    length: int
    method: str
    prefill_s: float | None = None
    decode_ms: float | None = None
    peak_gib: float | None = None
    kv_per_layer: list[int] | None = None
    error: str | None = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=None,
                        help="prompt lengths, comma-separated (default 8192,32768; tiny: 256,512)")
    parser.add_argument("--methods", default=",".join(ntkkv.METHODS), help="methods, comma-separated (default: all)")
    parser.add_argument("--budget", type=int, default=None, help="max_capacity_prompt (default 1024; tiny: 64)")
    parser.add_argument("--decode-steps", type=int, default=None, help="greedy decode steps (default 64; tiny: 8)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured runs per cell, median taken (default 3; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs per cell first (default 1)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float16 | float32 (default on CPU)")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model of the same family (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available; use --device cpu --tiny")
    on_cuda = args.device.type == "cuda"
    args.lengths = [int(n) for n in (args.lengths or ("256,512" if args.tiny else "8192,32768")).split(",")]
    args.methods = [canonical_name(m.strip()) for m in args.methods.split(",") if m.strip()]
    args.budget = args.budget or (64 if args.tiny else 1024)
    args.decode_steps = args.decode_steps or (8 if args.tiny else 64)
    args.repeats = args.repeats or (2 if args.tiny else 3)
    from ntkkv.models import resolve_dtype

    args.dtype = resolve_dtype(args.dtype or ("bfloat16" if on_cuda else "float32"))
    if args.dtype == "auto":
        parser.error("--dtype auto has no meaning for random weights; choose bfloat16, float16 or float32")
    return args


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights created directly on `device` in `dtype`: no fp32 copy of 8B parameters anywhere."""
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), attn_implementation="sdpa")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class Clock:
    """Wall time of GPU work through CUDA events, or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextmanager
    def measure(self, into: list):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            into.append(start.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            yield
            into.append(time.perf_counter() - start)


@torch.no_grad()
def run_once(model, prompt, decode_steps: int, clock: Clock, cache_argument: str) -> dict:
    """One prefill + greedy decode in a fresh cache: seconds, ms/token, peak bytes above the start."""
    on_cuda = prompt.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated(prompt.device)
        torch.cuda.reset_peak_memory_stats(prompt.device)
    cache = DynamicCache(config=model.config)
    prefill_s, decode_s = [], []
    with clock.measure(prefill_s):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
    returned = getattr(out, cache_argument, None)
    cache = cache if returned is None else returned
    kv_per_layer = ntkkv.kv_lengths(cache)
    token = out.logits[:, -1:].argmax(dim=-1)
    del out
    with clock.measure(decode_s):
        for _ in range(decode_steps):
            # no position_ids: the model places the token at cache.get_seq_length()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
            token = out.logits[:, -1:].argmax(dim=-1)
    peak = torch.cuda.max_memory_allocated(prompt.device) - resident if on_cuda else None
    return {"prefill_s": prefill_s[0], "decode_ms": 1000 * decode_s[0] / max(decode_steps, 1), "peak": peak,
            "kv_per_layer": kv_per_layer}


def measure_cell(model, prompt, method: str, args, clock: Clock, cache_argument: str) -> Cell:
    cell = Cell(prompt.shape[1], method)
    runs = []
    try:
        with ntkkv.compress(model, method=method, max_capacity_prompt=args.budget):
            for index in range(args.warmup + args.repeats):
                run = run_once(model, prompt, args.decode_steps, clock, cache_argument)
                if index >= args.warmup:
                    runs.append(run)
    except torch.cuda.OutOfMemoryError:
        cell.error = "OOM"
    finally:
        if prompt.device.type == "cuda":  # hand the failed or finished cell's memory back before the next
            gc.collect()
            torch.cuda.empty_cache()
    if cell.error is None:
        cell.prefill_s = statistics.median(run["prefill_s"] for run in runs)
        cell.decode_ms = statistics.median(run["decode_ms"] for run in runs)
        if runs[0]["peak"] is not None:
            cell.peak_gib = statistics.median(run["peak"] for run in runs) / GIB
        cell.kv_per_layer = runs[-1]["kv_per_layer"]
    return cell


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown_table(cells: list[Cell], args, model, weights_gib: float | None) -> str:
    config = model.config
    shape = "toy Llama (smoke test)" if args.tiny else "Llama-3-8B-shaped"
    lines = [
        f"**{device_name(args.device)}** — {shape} model with random weights "
        f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads / "
        f"{config.num_key_value_heads} KV heads, vocab {config.vocab_size}), {str(args.dtype).removeprefix('torch.')}, "
        f"sdpa, batch {args.batch_size}; budget {args.budget} (max_capacity_prompt); "
        f"median of {args.repeats} after {args.warmup} warm-up; decode over {args.decode_steps} greedy steps; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
        + (f"; weights {weights_gib:.2f} GiB" if weights_gib is not None else "")
        + ".",
        "",
        "| prompt | method | prefill (s) | vs FullKV | decode (ms/token) | vs FullKV | peak above weights (GiB) "
        "| KV/layer after prefill |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = {cell.length: cell for cell in cells if cell.method == "fullkv" and cell.error is None}
    for cell in cells:
        if cell.error is not None:
            lines.append(f"| {cell.length:,} | {cell.method} | {cell.error} | | {cell.error} | | {cell.error} | |")
            continue
        full = baseline.get(cell.length)
        prefill_vs = _relative(cell.prefill_s, full.prefill_s) if full and cell is not full else ""
        decode_vs = _relative(cell.decode_ms, full.decode_ms) if full and cell is not full else ""
        peak = f"{cell.peak_gib:.2f}" if cell.peak_gib is not None else "n/a"
        lines.append(
            f"| {cell.length:,} | {cell.method} | {cell.prefill_s:.3f} | {prefill_vs} | {cell.decode_ms:.2f} | "
            f"{decode_vs} | {peak} | {_kv_summary(cell.kv_per_layer)} |"
        )
    return "\n".join(lines) + "\n"


def _relative(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f}%"


def _kv_summary(per_layer: list[int]) -> str:
    low, high, mean = min(per_layer), max(per_layer), sum(per_layer) / len(per_layer)
    return f"{mean:,.0f}" if low == high else f"{mean:,.0f} ({low:,}–{high:,})"


def main(argv=None) -> int:
    args = parse_args(argv)
    model = build_model(args.tiny, args.device, args.dtype, args.seed)
    on_cuda = args.device.type == "cuda"
    weights_gib = torch.cuda.memory_allocated(args.device) / GIB if on_cuda else None
    cache_argument = cache_argument_name(model)
    generator = torch.Generator().manual_seed(args.seed)

    cells = []
    for length in args.lengths:
        prompt = torch.randint(0, model.config.vocab_size, (args.batch_size, length), generator=generator)
        prompt = prompt.to(args.device)
        for method in args.methods:
            cell = measure_cell(model, prompt, method, args, Clock(args.device), cache_argument)
            cells.append(cell)
            status = cell.error or f"prefill {cell.prefill_s:.3f} s, decode {cell.decode_ms:.2f} ms/token"
            print(f"[{length:>7,} tokens] {method:<12} {status}", file=sys.stderr, flush=True)

    table = markdown_table(cells, args, model, weights_gib)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
