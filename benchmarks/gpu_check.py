"""Checks the CUDA paths on a real model (default: the embedded SmolLM2) and prints a report.

    python benchmarks/gpu_check.py --model smollm2 --essays data/PaulGrahamEssays [--quick]

1. full budget: every method gives the unpatched model's greedy tokens (fp32 and bf16, sdpa and eager);
2. an exact summary state merged through the log-sum-exp reproduces full attention (fp32, fused decode merge),
   with and without the ratchet;
3. a left-padded batch gives each sample its alone output (fp32);
4. the static decode path, its step captured in a CUDA graph, against the dynamic path (model.generate over
   the compressed cache): every method, summaries with and without the ratchet, a left-padded batch of three
   needle prompts; tokens equal and the largest logit difference, fp32 and bf16; and the captured steps
   against the same steps run eagerly (the graph adds nothing of its own: bitwise equal).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ntkkv
from ntkkv.policies import build_policy
from ntkkv.summaries import Exact

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
LEARNED = Path(__file__).resolve().parents[1] / "assets" / "smollm2_learned_f2.pt"


def needle_ids(tokenizer, essays: Path, length: int, depth: float) -> list[int]:
    text = " ".join(path.read_text() for path in sorted(essays.glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:length]
    cut = int(len(ids) * depth)
    haystack = tokenizer.decode(ids[:cut]) + NEEDLE + tokenizer.decode(ids[cut:])
    messages = [{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]


def left_padded(rows, pad_id, device):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = torch.tensor(row)
        mask[index, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def chosen(args, methods) -> list[str]:
    """The methods of `methods` that --methods names (all without it)."""
    return [method for method in methods if args.methods is None or method in args.methods]


def max_logit_difference(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.output.logits, b.output.logits))


def full_budget_identity(args, model_cache):
    for dtype in ("float32", "bfloat16")[: 1 if args.quick else 2]:
        for backend in ("sdpa", "eager")[: 1 if args.quick else 2]:
            model, tokenizer = model_cache(dtype, backend)
            ids, mask = left_padded([needle_ids(tokenizer, args.essays, 1500, 0.5)], tokenizer.pad_token_id,
                                    args.device)
            reference = ntkkv.generate(model, ids, mask, decode="dynamic", max_new_tokens=24,
                                       tokenizer=tokenizer).new_tokens
            same = {}
            for method in chosen(args, ntkkv.METHODS):
                with ntkkv.compress(model, method, max_capacity_prompt=4096):
                    same[method] = [ntkkv.generate(model, ids, mask, decode=mode, max_new_tokens=24,
                                                  tokenizer=tokenizer).new_tokens
                                    == reference for mode in ("dynamic", "static")]
            print(f"[1] full budget, {dtype} {backend}: same tokens as the unpatched model (dynamic, static): {same}")


def exact_summary(args, model_cache):
    model, tokenizer = model_cache("float32", "sdpa")
    ids, mask = left_padded([needle_ids(tokenizer, args.essays, 1500, 0.5)], tokenizer.pad_token_id, args.device)
    options = dict(max_new_tokens=24, min_new_tokens=24, output_logits=True, return_dict_in_generate=True,
                   tokenizer=tokenizer)
    reference = ntkkv.generate(model, ids, mask, decode="dynamic", **options)
    # an exact state is per KV head: the head-wise methods take refitting summaries only
    uniform = [method for method in chosen(args, ntkkv.METHODS[1:]) if not build_policy(method).head_wise]
    for method in uniform:
        for ratchet in (None, 4):
            with ntkkv.compress(model, method, max_capacity_prompt=128, summary=Exact(), ratchet=ratchet):
                for mode in ("dynamic", "static"):
                    merged = ntkkv.generate(model, ids, mask, decode=mode, **options)
                    print(f"[2] exact summary + {method} 128, ratchet {ratchet}, {mode} (fp32): max |logit diff| vs "
                          f"full = {max_logit_difference(merged, reference):.2e}, "
                          f"same tokens: {merged.new_tokens == reference.new_tokens}")


def batch_equals_alone(args, model_cache):
    model, tokenizer = model_cache("float32", "sdpa")
    rows = [needle_ids(tokenizer, args.essays, 1500, 0.5), needle_ids(tokenizer, args.essays, 900, 0.2)]
    ids, mask = left_padded(rows, tokenizer.pad_token_id, args.device)
    for method in chosen(args, ntkkv.METHODS[1:]):
        with ntkkv.compress(model, method, max_capacity_prompt=128):
            for mode in ("dynamic", "static"):
                together = ntkkv.generate(model, ids, mask, decode=mode, max_new_tokens=16,
                                          tokenizer=tokenizer).new_tokens
                alone = [ntkkv.generate(model, torch.tensor([row], device=args.device), decode=mode,
                                        max_new_tokens=16, tokenizer=tokenizer).new_tokens[0] for row in rows]
                print(f"[3] batch of 2 (fp32) {method} {mode}: equal to alone: {together == alone}")


STATIC_CASES = [
    ("fullkv", {}),
    ("streamingllm", {}), ("h2o", {}), ("snapkv", {}), ("pyramidkv", {}),
    ("snapkv", {"ratchet": 8}),
    ("snapkv", {"summary": "merge", "state_budget": 0.125}),
    ("snapkv", {"summary": "merge", "state_budget": 0.125, "ratchet": 8}),
    ("pyramidkv", {"summary": "merge_variance", "state_budget": 0.125, "ratchet": 8}),
    ("snapkv", {"summary": "learned", "summary_path": str(LEARNED), "state_budget": 0.125}),
    ("snapkv", {"summary": "learned", "summary_path": str(LEARNED), "state_budget": 0.125, "ratchet": 8}),
    ("snapkv", {"summary": "taylor2_lowrank", "state_budget": 0.25, "ratchet": 8}),
    ("streamingllm", {"summary": "seed_taylor", "state_budget": 67, "ratchet": 8}),
    ("adakv", {}), ("ada_pyramidkv", {}), ("headkv", {}), ("kvzip", {}), ("pyramid_kvzip", {}),
    ("adakv", {"summary": "cam"}), ("headkv", {"summary": "fitted"}), ("snapkv", {"summary": "fitted"}),
    ("kvzip", {"summary": "fitted"}), ("snapkv", {"summary": "cam", "ratchet": 8}),
    ("ada_kvzip", {}), ("ada_kvzip", {"summary": "fitted"}),
]


def static_against_dynamic(args, model_cache):
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = model_cache(dtype, "sdpa")
        rows = [needle_ids(tokenizer, args.essays, length, depth) for length, depth in ((1500, 0.5), (1100, 0.2),
                                                                                        (700, 0.8))]
        ids, mask = left_padded(rows, tokenizer.pad_token_id, args.device)
        options = dict(max_new_tokens=32, min_new_tokens=32, output_logits=True, return_dict_in_generate=True,
                       tokenizer=tokenizer)
        for method, settings in STATIC_CASES[: 6 if args.quick else None]:
            if method not in chosen(args, [method]):
                continue
            budget = {} if method == "fullkv" else {"max_capacity_prompt": 128}
            with ntkkv.compress(model, method, **budget, **settings):
                dynamic = ntkkv.generate(model, ids, mask, decode="dynamic", **options)
                captured = ntkkv.generate(model, ids, mask, decode="static", **options)
                eager = ntkkv.generate(model, ids, mask, decode="static", cuda_graph=False, **options)
            same = [a == b for a, b in zip(captured.new_tokens, dynamic.new_tokens)]
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                     for a, b in zip(captured.new_tokens, dynamic.new_tokens)]
            graph_bitwise = all(torch.equal(a, b) for a, b in zip(captured.output.logits, eager.output.logits))
            label = f"{method} {' '.join(f'{k}={v}' for k, v in settings.items() if k != 'summary_path')}"
            print(f"[4] {dtype} {label:60s} tokens equal per sample {same} (first difference at {first}); "
                  f"max |logit diff| {max_logit_difference(captured, dynamic):.2e}; graph = eager steps: "
                  f"{graph_bitwise}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--essays", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer dtypes, backends and cases (a smoke run)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run only these sections (1-4)")
    parser.add_argument("--methods", nargs="*", default=None, help="check only these methods (default: every one)")
    args = parser.parse_args()
    import transformers

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}  torch {torch.__version__}  transformers {transformers.__version__}")
    loaded = {}

    def model_cache(dtype, backend):
        if (dtype, backend) not in loaded:
            loaded.clear()  # one model on the device at a time
            loaded[dtype, backend] = ntkkv.load_model(args.model, dtype=dtype, device_map=args.device,
                                                      attn_implementation=backend)
        return loaded[dtype, backend]

    sections = {1: full_budget_identity, 2: exact_summary, 3: batch_equals_alone, 4: static_against_dynamic}
    for number, section in sections.items():
        if args.only is None or number in args.only:
            started = time.perf_counter()
            section(args, model_cache)
            print(f"    (section {number}: {time.perf_counter() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
