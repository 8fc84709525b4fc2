"""Checks the CUDA path on a real model (default: the embedded SmolLM2) and prints a report.

    python benchmarks/gpu_check.py --model smollm2 --essays data/PaulGrahamEssays

1. full budget: every method gives the unpatched model's greedy tokens (bf16 and fp32, sdpa and eager);
2. a needle at ~1.5k and ~6k tokens: full model vs each method at budgets 128 / 256 / 512;
3. an exact kernel state merged through the log-sum-exp reproduces full attention (fp32);
4. a left-padded batch of two gives each sample its alone output (fp32);
5. the kernels: exact kernel + ratchet = full attention (fp32, fused decode merge), and every
   training-free kernel on the needle (bf16).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ntkkv
from ntkkv.summaries import SUMMARIES, Exact

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"


def needle_prompt(tokenizer, essays: Path, length: int, depth: float):
    text = " ".join(path.read_text() for path in sorted(essays.glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:length]
    cut = int(len(ids) * depth)
    haystack = tokenizer.decode(ids[:cut]) + NEEDLE + tokenizer.decode(ids[cut:])
    messages = [{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy(model, inputs, steps=24, **kwargs):
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    return ntkkv.generate(model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens=steps, **kwargs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--essays", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", default="1500,6000")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the needle runs")
    parser.add_argument("--quick", action="store_true", help="one dtype and backend only (a smoke run)")
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}")
    import transformers

    print(f"transformers {transformers.__version__}")
    for dtype in ("float32", "bfloat16")[: 1 if args.quick else 2]:
        for backend in ("sdpa", "eager")[: 1 if args.quick else 2]:
            model, tokenizer = ntkkv.load_model(args.model, dtype=dtype, device_map=device, attn_implementation=backend)
            inputs = needle_prompt(tokenizer, args.essays, 1500, 0.5)
            reference = greedy(model, inputs).new_tokens
            same = {}
            for method in ntkkv.METHODS:
                with ntkkv.compress(model, method, max_capacity_prompt=4096):
                    same[method] = greedy(model, inputs).new_tokens == reference
            print(f"[1] full budget, {dtype} {backend}: identical tokens per method: {same}")
    model, tokenizer = ntkkv.load_model(args.model, dtype=args.dtype, device_map=device)
    for length in map(int, args.lengths.split(",")):
        inputs = needle_prompt(tokenizer, args.essays, length, 0.5)
        full = tokenizer.decode(greedy(model, inputs).new_tokens[0], skip_special_tokens=True)
        print(f"[2] needle {inputs['input_ids'].shape[1]} tokens, depth 50%, full: {full!r}")
        for method in ntkkv.METHODS[1:]:
            for budget in (128, 256, 512)[: 1 if args.quick else 3]:
                with ntkkv.compress(model, method, max_capacity_prompt=budget):
                    start = time.perf_counter()
                    result = greedy(model, inputs)
                    seconds = time.perf_counter() - start
                answer = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True)
                found = "sandwich" in answer.lower() and "dolores" in answer.lower()
                print(f"    {method:12s} {budget:4d}: found={found!s:5s} kept/layer={result.kv_kept[0][:3]}... "
                      f"{seconds:.2f}s {answer[:80]!r}")
    model, tokenizer = ntkkv.load_model(args.model, dtype="float32", device_map=device)
    inputs = needle_prompt(tokenizer, args.essays, 1500, 0.5)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    options = dict(max_new_tokens=8, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    reference = ntkkv.generate(model, inputs["input_ids"], **options)
    for method in ntkkv.METHODS[1:]:
        with ntkkv.compress(model, method, max_capacity_prompt=128, summary=Exact()):
            merged = ntkkv.generate(model, inputs["input_ids"], **options)
        error = max((a - b).abs().max().item() for a, b in zip(merged.output.logits, reference.output.logits))
        print(f"[3] exact kernel + {method} 128 (fp32): max |logit diff| vs full = {error:.2e}, "
              f"same tokens: {merged.new_tokens == reference.new_tokens}")
    other = needle_prompt(tokenizer, args.essays, 900, 0.2)
    tokenizer.padding_side = "left"
    n1, n2 = inputs["input_ids"].shape[1], other["input_ids"].shape[1]
    batch = torch.full((2, n1), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, n1, dtype=torch.long)
    batch[0], mask[0] = inputs["input_ids"][0].cpu(), 1
    batch[1, n1 - n2:], mask[1, n1 - n2:] = other["input_ids"][0], 1
    for method in ntkkv.METHODS[1:]:
        with ntkkv.compress(model, method, max_capacity_prompt=128):
            together = ntkkv.generate(model, batch.to(device), mask.to(device), max_new_tokens=16).new_tokens
            alone = [ntkkv.generate(model, p.to(device), max_new_tokens=16).new_tokens[0]
                     for p in (inputs["input_ids"], other["input_ids"])]
        print(f"[4] batch of 2 (fp32) {method}: equal to alone: {together == alone}")
    options["max_new_tokens"] = options["min_new_tokens"] = 24
    reference = ntkkv.generate(model, inputs["input_ids"], **options)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=128, summary=Exact(), ratchet=4):
        merged = ntkkv.generate(model, inputs["input_ids"], **options)
    error = max((a - b).abs().max().item() for a, b in zip(merged.output.logits, reference.output.logits))
    print(f"[5] exact kernel + ratchet 4, 24 steps (fp32): max |logit diff| vs full = {error:.2e}, same tokens: "
          f"{merged.new_tokens == reference.new_tokens}, slots per layer {merged.cache.layers[0].num_slots()}")
    model, tokenizer = ntkkv.load_model(args.model, dtype=args.dtype, device_map=device)
    inputs = needle_prompt(tokenizer, args.essays, 6000, 0.5)
    for kernel in SUMMARIES:
        if kernel == "learned":
            continue
        for method in ("snapkv", "pyramidkv"):
            budget_share = 0.5 if kernel in ("taylor1", "taylor2_diag", "seed_taylor") else 0.25
            try:
                with ntkkv.compress(model, method, max_capacity_prompt=128, summary=kernel, state_budget=budget_share):
                    start = time.perf_counter()
                    result = greedy(model, inputs)
                    seconds = time.perf_counter() - start
            except ValueError as error:
                print(f"    {kernel} {method}: {error}")
                continue
            answer = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True)
            found = "sandwich" in answer.lower() and "dolores" in answer.lower()
            print(f"[5] {kernel:16s} {method:10s} 128: found={found!s:5s} {seconds:.2f}s {answer[:70]!r}")


if __name__ == "__main__":
    main()
