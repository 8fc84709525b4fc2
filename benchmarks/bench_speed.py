"""Decode speed, throughput and memory of each method on a Llama-3-8B-shaped model with random weights.

    python benchmarks/bench_speed.py --out docs/results/DATE-speed-h200.md        # the GPU table (minutes)
    python benchmarks/bench_speed.py --lengths 8192 --batches 1,8 --methods fullkv,snapkv --steps 16
    python benchmarks/bench_speed.py --device cpu --tiny                              # smoke test, seconds

For each prompt length, each method runs one real prefill of one prompt (timed: median of
--prefill-repeats); its compressed cache is then copied to each batch size (the decode cost depends on
the cache's size, not on what it holds), and decode is timed there:
  static     ms per token of the static path: the captured decode step replayed (CUDA graph),
             --steps steps, median of --repeats; tokens/s = batch / (ms per token);
  dynamic    the same steps through model.forward over the compressed cache, one token at a time (the
             path before the static cache), at the batches given by --dynamic-batches;
  peak       the most memory allocated above the weights while the static cache decodes.
`--largest` finds, per method given there, the largest batch whose static cache and decode fit at the
longest prompt (from the bytes a sample takes, backing off on out-of-memory) and times it there.
`--anchor P:B,...` times transformers' own generate with its static cache (cache_implementation=
"static", which compiles the decode step), full KV, on P-token prompts at batch B: (t(N) - t(1)) /
(N - 1) for N = --steps + 1 new tokens, after a compiling call.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import ntkkv
from ntkkv.cache import CompressedCache, StaticCache
from ntkkv.generation import StaticDecoder, _prefill, cache_argument_name
from ntkkv.models import resolve_dtype
from ntkkv.reconstruction import ReconstructionPrompt, reconstructing
from ntkkv.summaries import Learned, LearnedFeatures

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=131072)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            max_position_embeddings=4096)
GIB = 1024**3
# random weights have no tokenizer: KVzip's requests as long as Llama-3's, of arbitrary tokens
REQUEST = ReconstructionPrompt(first=[0] * 11, later=[0] * 16, closing=[0] * 5)
# label -> (method, compress options); the learned map is made for the model's shape at run time
CONFIGURATIONS = {
    "fullkv": ("fullkv", {}),
    "streamingllm": ("streamingllm", {}),
    "snapkv": ("snapkv", {}),
    "pyramidkv": ("pyramidkv", {}),
    "kvzip": ("kvzip", {}),  # its prefill time includes the reconstruction pass
    "snapkv+fitted": ("snapkv", {"summary": "fitted"}),  # its prefill time includes the least-squares refit
    "kvzip+fitted": ("kvzip", {"summary": "fitted"}),
    "snapkv+merge": ("snapkv", {"summary": "merge", "state_budget": 0.125}),
    "snapkv+learned": ("snapkv", {"summary": "learned", "state_budget": 0.125}),
}


@dataclass
class Row:
    length: int
    label: str
    batch: int
    prefill_s: float | None = None
    static_ms: float | None = None
    dynamic_ms: float | None = None
    peak_gib: float | None = None
    slots: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=None, help="prompt lengths (default 8192,32768,131072; tiny: 256,512)")
    parser.add_argument("--methods", default=",".join(CONFIGURATIONS), help=f"of {', '.join(CONFIGURATIONS)}")
    parser.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32; tiny: 1,2)")
    parser.add_argument("--long-batches", default="1", help="batch sizes at prompts over 64k tokens (default 1)")
    parser.add_argument("--long-methods", default="fullkv,snapkv", help="methods at prompts over 64k tokens")
    parser.add_argument("--dynamic-batches", default="1,8", help="batches that also time the dynamic path")
    parser.add_argument("--largest", default="fullkv,snapkv", help="methods whose largest batch is found ('' none)")
    parser.add_argument("--anchor", default="", help="transformers' static cache + compile: PROMPT:BATCH,...")
    parser.add_argument("--budget", type=int, default=None, help="max_capacity_prompt (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64; tiny 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode runs, median taken (default 3)")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="timed prefills, median taken (default 1)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float16 | float32 (default CPU)")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model of the same family (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown tables here too")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available; use --device cpu --tiny")
    numbers = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    args.lengths = numbers(args.lengths or ("256,512" if args.tiny else "8192,32768,131072"))
    args.batches = numbers(args.batches or ("1,2" if args.tiny else "1,8,32"))
    args.long_batches, args.dynamic_batches = numbers(args.long_batches), numbers(args.dynamic_batches)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.long_methods = [m.strip() for m in args.long_methods.split(",") if m.strip()]
    args.largest = [m.strip() for m in args.largest.split(",") if m.strip()]
    unknown = sorted(set(args.methods + args.long_methods + args.largest) - set(CONFIGURATIONS))
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from: {', '.join(CONFIGURATIONS)}")
    args.anchor = [tuple(int(x) for x in pair.split(":")) for pair in args.anchor.split(",") if pair.strip()]
    args.budget = args.budget or (64 if args.tiny else 1024)
    args.steps = args.steps or (8 if args.tiny else 64)
    args.repeats = args.repeats or 3
    args.dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
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
    model.generation_config.pad_token_id = 0
    return model.eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function) -> float:
    """Seconds of `function()` (CUDA events on the GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        function()
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def compress_options(label, args, model):
    method, options = CONFIGURATIONS[label]
    options = dict(options)
    if options.get("summary") == "learned":  # a map of the right shape, started at the merged slot
        layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        features = LearnedFeatures(layers, kv_heads, model.config.hidden_size // model.config.num_attention_heads, 2,
                                   init="merge").requires_grad_(False)
        options["summary"] = Learned(options.pop("state_budget"), features=features)
    return method, ({} if method == "fullkv" else {"max_capacity_prompt": args.budget}), options


def repeated(cache: CompressedCache, batch: int) -> CompressedCache:
    """A copy of a one-sample prefilled cache holding `batch` samples (each layer's tensors repeated)."""
    import copy

    copied = copy.copy(cache)
    copied.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        twin.keys, twin.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        twin.bias = layer.bias.repeat(batch, 1, 1)
        twin.prefill_tokens = layer.prefill_tokens * batch
        if layer.state is not None:
            twin.state = copy.copy(layer.state)
            for name, value in vars(layer.state).items():
                if isinstance(value, torch.Tensor):
                    setattr(twin.state, name, value.repeat(batch, *[1] * (value.dim() - 1)))
        copied.layers.append(twin)
    return copied


def repeated_static(cache: CompressedCache, batch: int, room: int) -> StaticCache:
    """The static cache of a one-sample prefilled cache, made to hold `batch` copies of the sample: each
    buffer allocated once at its full size (a batch that fills the GPU has no room for a second copy)."""
    single = StaticCache.from_compressed([repeated(cache, 1)], room=room)
    for layer in single.layers:
        layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        layer.bias = layer.bias.repeat(batch, 1, 1)
        if layer.state is not None:
            for name, value in vars(layer.state).items():
                if isinstance(value, torch.Tensor):
                    setattr(layer.state, name, value.repeat(batch, *[1] * (value.dim() - 1)))
    return single


def time_static(model, cache, batch, length, args) -> tuple[float, float | None, int]:
    """(median ms per decode step, peak GiB above the weights, slots per layer) of the static path."""
    device = args.device
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total_steps = 2 + args.repeats * args.steps
    static = repeated_static(cache, batch, total_steps + 1)
    logits = torch.zeros(batch, model.config.vocab_size, device=device)
    decoder = StaticDecoder(model, static, logits, torch.full((batch,), length, device=device), total_steps + 1, 0, [],
                            0)

    def steps(count):
        for _ in range(count):
            static.before_step()
            decoder._run_step()
            static.after_step()

    steps(2)  # the eager step and the capture
    runs = [1000 * timed(device, lambda: steps(args.steps)) / args.steps for _ in range(args.repeats)]
    peak = (torch.cuda.max_memory_allocated(device) - weights) / GIB if device.type == "cuda" else None
    slots = static.layers[0].capacity
    decoder.graphs.clear()
    release(device)
    return statistics.median(runs), peak, slots


def time_dynamic(model, cache, batch, args) -> float:
    """Median ms per decode step of model.forward over a copy of the compressed cache (the dynamic path)."""
    name = cache_argument_name(model)
    runs = []
    for _ in range(args.repeats):
        dynamic = repeated(cache, batch)
        token = torch.zeros(batch, 1, dtype=torch.long, device=args.device)
        model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: dynamic})  # warm-up step

        def steps(dynamic=dynamic, token=token):
            for _ in range(args.steps):
                model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: dynamic})
        runs.append(1000 * timed(args.device, steps) / args.steps)
        del dynamic
    release(args.device)
    return statistics.median(runs)


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sample_bytes(cache: CompressedCache, extra_slots: int) -> int:
    """Bytes of one sample's static cache: every layer's K/V and bias at its capacity, and its state."""
    total = 0
    for layer in cache.layers:
        slots = layer.keys.shape[-2] + extra_slots
        total += 2 * slots * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        total += slots * layer.keys.shape[1] * 4
        if layer.state is not None:
            total += sum(value.numel() * value.element_size() for value in vars(layer.state).values()
                         if isinstance(value, torch.Tensor))
    return total


def prefill_one(model, prompt, label, args):
    """The compressed cache of one prompt under `label` and the median prefill seconds."""
    method, budget, options = compress_options(label, args, model)
    seconds, cache = [], None
    from ntkkv.compressor import Compressor
    from ntkkv.forward import patched

    context = ntkkv.compress(model, method, **budget, **options) if method != "fullkv" \
        else patched(model, Compressor(None))
    with context:
        for _ in range(args.prefill_repeats):
            cache = CompressedCache(config=model.config)
            mask = torch.ones_like(prompt)
            seconds.append(timed(args.device, lambda c=cache: prefill(model, prompt, mask, c)))
    return cache, statistics.median(seconds), (method, budget, options)


def prefill(model, prompt, mask, cache):
    """The prefill as ntkkv.generate runs it, with KVzip's reconstruction pass (nothing more for the others)."""
    with reconstructing(model, cache, prompt=REQUEST):
        _prefill(model, prompt, mask, cache)


def decode_rows(model, prompt, label, batches, args, rows, with_dynamic, report=lambda: None):
    """Prefill once, then time the static (and dynamic) decode at each batch size."""
    length = prompt.shape[1]
    cache, prefill_s, (method, budget, options) = prefill_one(model, prompt, label, args)
    context = ntkkv.compress(model, method, **budget, **options) if method != "fullkv" else None
    from ntkkv.compressor import Compressor
    from ntkkv.forward import patched

    with context or patched(model, Compressor(None)):
        for batch in batches:
            row = Row(length, label, batch, prefill_s)
            try:
                row.static_ms, row.peak_gib, row.slots = time_static(model, cache, batch, length, args)
                if with_dynamic and batch in args.dynamic_batches:
                    row.dynamic_ms = time_dynamic(model, cache, batch, args)
            except torch.cuda.OutOfMemoryError:
                row.note = "OOM"
                release(args.device)
            rows.append(row)
            report()
            print(f"[{length:>7,}] {label:<15} batch {batch:>4}: static {row.static_ms} ms, dynamic "
                  f"{row.dynamic_ms} ms, peak {row.peak_gib} GiB {row.note}", file=sys.stderr, flush=True)
    return cache, (method, budget, options)


def largest_batch(model, prompt, label, args, rows, report=lambda: None):
    """The most samples whose static cache fits beside the weights, and their decode speed."""
    length = prompt.shape[1]
    cache, prefill_s, (method, budget, options) = prefill_one(model, prompt, label, args)
    # the cache, and per sample a few copies of the step's logits and activations
    per_sample = sample_bytes(cache, 2 + args.repeats * args.steps + 2) + 16 * model.config.vocab_size
    release(args.device)
    if args.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(args.device)
        batch = max(1, min(4096, int(0.92 * free / per_sample)))
    else:  # the smoke test: memory does not bound a CPU batch
        batch = 4
    from ntkkv.compressor import Compressor
    from ntkkv.forward import patched

    context = ntkkv.compress(model, method, **budget, **options) if method != "fullkv" \
        else patched(model, Compressor(None))
    with context:
        while batch >= 1:
            row = Row(length, label, batch, prefill_s, note="largest batch")
            try:
                row.static_ms, row.peak_gib, row.slots = time_static(model, cache, batch, length, args)
                rows.append(row)
                report()
                print(f"[{length:>7,}] {label:<15} largest batch {batch}: {row.static_ms:.2f} ms", file=sys.stderr,
                      flush=True)
                return
            except torch.cuda.OutOfMemoryError:
                release(args.device)
                batch = int(batch * 0.85)


def anchor_rows(model, args, rows, report=lambda: None):
    """transformers' generate with its static cache (compiled decode), full KV."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    for length, batch in args.anchor:
        prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(args.device)
        steps = args.steps + 1
        options = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
        try:
            model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, **options)  # compiles
            one = statistics.median(timed(args.device, lambda: model.generate(prompt, max_new_tokens=1, **options))
                                    for _ in range(args.repeats))
            full = statistics.median(timed(args.device, lambda: model.generate(
                prompt, max_new_tokens=steps, min_new_tokens=steps, **options)) for _ in range(args.repeats))
            row = Row(length, "transformers static+compile", batch, static_ms=1000 * (full - one) / (steps - 1))
        except Exception as error:  # the anchor is a reference: a failure is reported, not fatal
            row = Row(length, "transformers static+compile", batch, note=f"failed: {type(error).__name__}: "
                                                                        f"{str(error).splitlines()[0][:80]}")
        rows.append(row)
        report()
        print(f"[{length:>7,}] anchor batch {batch}: {row.static_ms} ms {row.note}", file=sys.stderr, flush=True)
        release(args.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[Row], args, model, weights_gib) -> str:
    config = model.config
    shape = "toy Llama (smoke test)" if args.tiny else "Llama-3-8B-shaped"
    head = (f"**{device_name(args.device)}**: {shape} model with random weights ({config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, "
            f"vocab {config.vocab_size}), {str(args.dtype).removeprefix('torch.')}, sdpa prefill; budget "
            f"{args.budget}; decode timed over {args.steps} steps, median of {args.repeats}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}"
            + (f"; weights {weights_gib:.2f} GiB" if weights_gib is not None else "") + ".")
    lines = [head, "", "| prompt | method | batch | prefill (s, batch 1) | static decode (ms/token) | tokens/s | "
             "vs FullKV | dynamic decode (ms/token) | static vs dynamic | peak above weights (GiB) | slots/layer | "
             "note |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    full = {(row.length, row.batch): row for row in rows if row.label == "fullkv" and row.static_ms}

    def number(value, form):
        return "" if value is None else format(value, form)

    for row in rows:
        base = full.get((row.length, row.batch))
        versus = f"{row.static_ms / base.static_ms:.2f}×" if base and row.static_ms and row is not base else ""
        speedup = f"{row.dynamic_ms / row.static_ms:.1f}× faster" if row.static_ms and row.dynamic_ms else ""
        tokens = row.batch * 1000 / row.static_ms if row.static_ms else None
        lines.append(f"| {row.length:,} | {row.label} | {row.batch} | {number(row.prefill_s, '.3f')} | "
                     f"{number(row.static_ms, '.2f')} | {number(tokens, ',.0f')} | {versus} | "
                     f"{number(row.dynamic_ms, '.2f')} | {speedup} | {number(row.peak_gib, '.2f')} | "
                     f"{number(row.slots, ',')} | {row.note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    model = build_model(args.tiny, args.device, args.dtype, args.seed)
    weights_gib = torch.cuda.memory_allocated(args.device) / GIB if args.device.type == "cuda" else None
    generator = torch.Generator().manual_seed(args.seed)
    rows: list[Row] = []

    def report():  # the table so far, so that a run cut short keeps what it measured
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(markdown(rows, args, model, weights_gib), encoding="utf-8")

    with torch.inference_mode():
        for length in args.lengths:
            prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(args.device)
            long = length > 65536
            for label in (args.long_methods if long else args.methods):
                decode_rows(model, prompt, label, args.long_batches if long else args.batches, args, rows,
                            with_dynamic=not long, report=report)
                release(args.device)
        longest = torch.randint(0, model.config.vocab_size, (1, min(max(args.lengths), 32768)),
                                generator=generator).to(args.device)
        for label in args.largest:
            largest_batch(model, longest, label, args, rows, report)
            release(args.device)
    if args.anchor:
        anchor_rows(model, args, rows, report)
    table = markdown(rows, args, model, weights_gib)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
