"""Head-wise budgets (AdaKV, HeadKV) against SnapKV at the same budget: memory and decode speed.

    python benchmarks/bench_headwise.py --out docs/results/DATE-headwise-h200.md   # the GPU table (minutes)
    python benchmarks/bench_headwise.py --device cpu --tiny                        # smoke test, seconds

A Llama-3-8B-shaped model with random weights (bf16) prefills a real batch of prompts under each method
(the same budget per layer and KV head), then decodes it on the static path (the captured step replayed):
  prefill peak   the most memory allocated above the weights during the prefill (GiB);
  cache          the static cache's bytes: keys, values and the bias of every slot (GiB);
  decode peak    the most memory allocated above the weights while decoding (GiB);
  ms/token       static decode, --steps steps, median of --repeats, and its ratio to SnapKV's in the same run.
SnapKV holds kv_heads × (budget + new tokens) slots per layer; AdaKV and HeadKV hold the same total packed
per head without padding (ragged). HeadKV reads a head-scores file: random weights have no retrieval heads,
so the run makes a skewed synthetic one (seeded) for the model's shape, or takes --head_scores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import ntkkv
from ntkkv.cache import CompressedCache, StaticCache
from ntkkv.generation import StaticDecoder, _prefill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import GIB, build_model, release, timed  # noqa: E402

METHODS = ("snapkv", "adakv", "headkv", "pyramidkv", "ada_pyramidkv")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help="PROMPT:BATCH,... (default 8192:1,8192:8,32768:1,32768:8; "
                                                      "tiny 256:1,256:2)")
    parser.add_argument("--methods", default=",".join(METHODS[:3]), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--budget", type=int, default=None, help="max_capacity_prompt (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64; tiny 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs, median taken")
    parser.add_argument("--head_scores", default=None,
                        help="a head-scores file for the model (default: synthetic for the random model, the policy's "
                             "default (SmolLM2's) with --model_path)")
    parser.add_argument("--model_path", default=None,
                        help="a real model instead of the random 8B shape (smollm2, a folder, a .gguf file)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available; use --device cpu --tiny")
    cases = args.cases or ("256:1,256:2" if args.tiny else "8192:1,8192:8,32768:1,32768:8")
    args.cases = [tuple(int(x) for x in case.split(":")) for case in cases.split(",") if case.strip()]
    args.methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    args.budget = args.budget or (64 if args.tiny else 1024)
    args.steps = args.steps or (4 if args.tiny else 64)
    return args


def synthetic_head_scores(config, path: Path, seed: int) -> str:
    """Skewed scores of the model's shape: a few heads score high, as retrieval heads do in real models."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=generator) ** 6
    path.write_text(json.dumps({"format": "ntkkv-head-scores/1", "model": "synthetic", "score": "synthetic",
                                "num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
                                "num_kv_heads": config.num_key_value_heads, "scores": scores.tolist()}))
    return str(path)


def peak_above(device, weights) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - weights) / GIB if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def static_bytes(static: StaticCache) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in static.layers
               for tensor in (layer.keys, layer.values, layer.bias))


def run_case(model, method, options, length, batch, args) -> dict:
    device = args.device
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    generator = torch.Generator().manual_seed(args.seed + length)
    prompt = torch.randint(10, model.config.vocab_size, (batch, length), generator=generator).to(device)
    mask = torch.ones_like(prompt)
    total_steps = 2 + args.repeats * args.steps
    with ntkkv.compress(model, method, max_capacity_prompt=args.budget, **options):
        reset_peak(device)
        cache = CompressedCache(config=model.config)
        logits = _prefill(model, prompt, mask, cache).float()
        prefill_peak = peak_above(device, weights)
        reset_peak(device)
        static = StaticCache.from_compressed([cache], room=total_steps + 1)
        del cache
        decoder = StaticDecoder(model, static, logits, mask.sum(dim=1), total_steps + 1, 0, [], 0)

        def steps(count):
            for _ in range(count):
                static.before_step()
                decoder._run_step()
                static.after_step()

        steps(2)  # the eager step and the capture
        runs = [1000 * timed(device, lambda: steps(args.steps)) / args.steps for _ in range(args.repeats)]
        row = {"length": length, "batch": batch, "method": method, "prefill_peak": prefill_peak,
               "cache": static_bytes(static) / GIB, "decode_peak": peak_above(device, weights),
               "ms": statistics.median(runs)}
        decoder.graphs.clear()
    return row


def table(rows, args, config) -> str:
    gib = lambda value: "" if value is None else f"{value:.3f}"  # noqa: E731
    shape = args.model_path or ("A 4-layer toy model, random weights" if args.tiny
                                else "Llama-3-8B-shaped model, random weights")
    lines = [f"{shape} ({config.num_hidden_layers} layers, "
             f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads), "
             f"{str(model_dtype(args)).replace('torch.', '')}; budget {args.budget} per layer and KV head; decode "
             f"{args.steps} steps, median of {args.repeats}.", "",
             "| prompt | batch | method | prefill peak (GiB) | static cache (GiB) | decode peak (GiB) | ms/token "
             "| vs SnapKV |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    snap = {(row["length"], row["batch"]): row["ms"] for row in rows if row["method"] == "snapkv"}
    for row in rows:
        base = snap.get((row["length"], row["batch"]))
        ratio = f"{row['ms'] / base:.3f}×" if base and row["method"] != "snapkv" else ""
        lines.append(f"| {row['length']:,} | {row['batch']} | {row['method']} | {gib(row['prefill_peak'])} | "
                     f"{gib(row['cache'])} | {gib(row['decode_peak'])} | {row['ms']:.2f} | {ratio} |")
    return "\n".join(lines)


def model_dtype(args):
    return torch.bfloat16 if args.device.type == "cuda" else torch.float32


def main(argv=None):
    args = parse_args(argv)
    if args.model_path:
        model, _ = ntkkv.load_model(args.model_path, dtype=model_dtype(args), device_map=str(args.device))
    else:
        model = build_model(args.tiny, args.device, model_dtype(args), args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        scores = args.head_scores
        if scores is None and not args.model_path:
            scores = synthetic_head_scores(model.config, Path(folder) / "scores.json", args.seed)
        for length, batch in args.cases:
            for method in args.methods:
                options = {"head_scores": scores} if method == "headkv" and scores else {}
                rows.append(run_case(model, method, options, length, batch, args))
                release(args.device)
                print(f"[{length:>7,} × {batch}] {method:<14} {rows[-1]['ms']:.2f} ms/token, cache "
                      f"{rows[-1]['cache']:.3f} GiB", file=sys.stderr, flush=True)
    text = table(rows, args, model.config)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
