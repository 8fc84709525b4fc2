"""Attention fidelity of each method × summary at equal memory, on a model's real activations.

    python benchmarks/bench_fidelity.py --device cuda --out docs/bench_fidelity.md    # SmolLM2, 2k and 6k
    python benchmarks/bench_fidelity.py --summaries none merge taylor2_lowrank --state_budgets 0.25
    python benchmarks/bench_fidelity.py --tiny --device cpu                          # smoke test, seconds

The prompt is the needle test's (the essays, the needle at 50% depth, the question, the chat
template) at each --lengths; the unpatched model then answers it greedily for --decode_tokens
tokens, and one forward pass over prompt + answer records every layer's queries, keys and values.
For each configuration every layer compresses the prompt's keys and values exactly as the
patched attention does at the prefill (`Compressor.compress_layer`), and reads them through
the same merge as at decode (`merged_attention`):
  last query    the prompt's last query, over the compressed prompt;
  decode        the answer's queries, over the compressed prompt plus the answer's own keys (exact).
Error = ‖o − o_full‖ / ‖o_full‖ per layer, query head and query, averaged; o_full is full
attention. Memory is per layer and KV head in token equivalents (exact tokens + state); every row
of a budget spends the same memory, except "exact" (the exact-exp kernel: a ceiling that keeps
every token). "vs evict" divides by the same method's plain eviction at that budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ntkkv.cache import CompressedLayer
from ntkkv.forward import merged_attention
from ntkkv.models import load_model, model_shape
from ntkkv.ops import reference_attention, slot_logit_bias
from ntkkv.patch import build_compressor
from ntkkv.plan import check_compression
from ntkkv.summaries import Exact, refits_kept
from ntkkv.training import capture_attention


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144], help="prompt lengths in tokens")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv"])
    parser.add_argument("--summaries", "--kernels", dest="summaries", nargs="+",
                        default=["none", "merge", "merge:position", "taylor1", "taylor2_diag", "taylor2_lowrank",
                                 "seed_taylor", "fitted", "exact"],
                        help="summary names; 'NAME:position' clusters by position; 'learned' needs --summary_path")
    parser.add_argument("--state_budgets", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--rank", type=int, default=None, help="taylor2_lowrank's rank")
    parser.add_argument("--summary_path", "--kernel_path", dest="summary_path", default=None)
    parser.add_argument("--window_size", type=int, default=8)
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--depth", type=float, default=50.0, help="needle depth in percent")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and random tokens (smoke test)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here, and the rows as .json")
    return parser.parse_args(argv)


def configurations(args):
    """(method, summary label, compress kwargs) for every row, eviction first."""
    rows = []
    for method in args.methods:
        for entry in args.summaries:
            name, _, cluster_by = entry.partition(":")
            if name in ("none", "exact"):
                rows.append((method, name, {"summary": Exact() if name == "exact" else None}))
                continue
            if refits_kept(name):  # fitted, cam: they rewrite the kept slots, no state share to sweep
                rows.append((method, name, {"summary": name}))
                continue
            for state_budget in args.state_budgets:
                options = {"summary": name, "state_budget": state_budget}
                if cluster_by:
                    options["cluster_by"] = cluster_by
                if name == "taylor2_lowrank" and args.rank:
                    options["rank"] = args.rank
                if name == "learned":
                    options["summary_path"] = args.summary_path
                rows.append((method, f"{entry} {state_budget:g}", options))
    return rows


def needle_prompt(model, tokenizer, length, depth, decode_tokens, device):
    """Prompt ids of the needle test at `length` tokens, and the unpatched model's greedy answer."""
    from ntkkv.eval import needle

    haystack = needle.Haystack(tokenizer)
    context, _ = haystack.context(length, depth)
    prompt = needle.build_prompt(tokenizer, context, needle.DEFAULT_RETRIEVAL_QUESTION)
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    answer = model.generate(prompt_ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
    return answer[:, : prompt_ids.shape[1]], answer[:, prompt_ids.shape[1] :]


def full_outputs(activations, prompt_length):
    """Per layer: full attention of the last prompt query and of the answer's queries (float32)."""
    outputs = []
    for layer in activations:
        batch, heads, n, head_dim = layer.queries.shape
        kv_heads = layer.keys.shape[1]
        queries = layer.queries[:, :, prompt_length - 1 :].reshape(batch, kv_heads, -1, head_dim)
        bias = torch.zeros(batch, kv_heads, n, device=queries.device)
        logit_bias = slot_logit_bias(bias, n - prompt_length + 1).repeat(1, 1, heads // kv_heads, 1)
        outputs.append(reference_attention(queries, layer.keys, layer.values, logit_bias, layer.scaling)[1])
    return outputs


def compressed_outputs(compressor, model, activations, prompt_length):
    """Per layer: the same queries read through the compressed prompt, as the patched attention reads."""
    outputs, memory = [], []
    for layer_idx, layer in enumerate(activations):
        batch, heads, n, head_dim = layer.queries.shape
        kv_heads = layer.keys.shape[1]
        cache_layer = CompressedLayer()
        prompt = slice(0, prompt_length)
        valid = torch.ones(batch, prompt_length, dtype=torch.bool, device=layer.keys.device)
        cache_layer.store(compressor.compress_layer(layer.queries[:, :, prompt], layer.keys[:, :, prompt],
                                                    layer.values[:, :, prompt], valid, layer_idx, len(activations),
                                                    layer.scaling), prompt_length)
        memory.append(cache_layer.real_slots_per_sample()[0] + cache_layer.state_tokens())
        group = heads // kv_heads
        last = layer.queries[:, :, prompt_length - 1 : prompt_length].reshape(batch, kv_heads, group, head_dim)
        last_output = merged_attention(last, *cache_layer.attention_inputs(), cache_layer.state, layer.scaling, 1)
        cache_layer.update(layer.keys[:, :, prompt_length:], layer.values[:, :, prompt_length:])
        answer = n - prompt_length
        decode = layer.queries[:, :, prompt_length:].reshape(batch, kv_heads, group * answer, head_dim)
        decode_output = merged_attention(decode, *cache_layer.attention_inputs(), cache_layer.state, layer.scaling,
                                         answer)
        # back to the layout of full_outputs: per KV head, each query head's [last, answer...] rows
        joined = torch.cat([last_output.view(batch, kv_heads, group, 1, head_dim),
                            decode_output.view(batch, kv_heads, group, answer, head_dim)], dim=3)
        outputs.append(joined.view(batch, kv_heads, group * (answer + 1), head_dim))
    return outputs, sum(memory) / len(memory)


def relative_errors(outputs, targets, group):
    """Mean relative error of the last prompt query and of the answer's queries."""
    last, decode = [], []
    for output, target in zip(outputs, targets):
        batch, kv_heads, rows, head_dim = target.shape
        shape = (batch, kv_heads, group, rows // group, head_dim)
        reference = target.view(shape)
        error = (output.view(shape) - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
        last.append(error[..., 0].mean())
        decode.append(error[..., 1:].mean())
    return float(torch.stack(last).mean()), float(torch.stack(decode).mean())


def load(args, device):
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device).eval(), None
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return load_model(args.model_name, dtype=dtype, device_map=device)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = configurations(args)  # a bad summary name or flag fails before the model loads
    for method, _, options in rows:
        build_compressor(method, max(args.budgets), window_size=args.window_size, **options)
    model, tokenizer = load(args, device)
    shape = model_shape(model)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    results = []
    for length in args.lengths:
        if args.tiny:
            generator = torch.Generator().manual_seed(length)
            ids = torch.randint(3, 256, (1, length + args.decode_tokens), generator=generator).to(device)
            prompt_ids, answer_ids = ids[:, :length], ids[:, length:]
        else:
            prompt_ids, answer_ids = needle_prompt(model, tokenizer, length, args.depth, args.decode_tokens, device)
        activations = capture_attention(model, torch.cat([prompt_ids, answer_ids], dim=1))
        targets = full_outputs(activations, prompt_ids.shape[1])
        group = activations[0].queries.shape[1] // activations[0].keys.shape[1]
        for budget in args.budgets:
            for method, label, options in rows:
                try:
                    compressor = build_compressor(method, budget, window_size=args.window_size, **options)
                    check_compression(compressor.policy, compressor.summary, shape)
                except ValueError as error:  # this state does not fit this budget: say so in the table
                    results.append(dict(length=prompt_ids.shape[1], budget=budget, method=method, summary=label,
                                        skipped=str(error).split(";")[0]))
                    continue
                started = time.perf_counter()
                outputs, memory = compressed_outputs(compressor, model, activations, prompt_ids.shape[1])
                last, decode = relative_errors(outputs, targets, group)
                results.append(dict(length=prompt_ids.shape[1], budget=budget, method=method, summary=label,
                                    memory=memory, last=last, decode=decode,
                                    seconds=time.perf_counter() - started))
    table = format_table(results, card, model_label(args), args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


def model_label(args):
    return "tiny random Llama" if args.tiny else args.model_name


def format_table(results, card, model, args):
    evict = {(r["length"], r["budget"], r["method"]): r for r in results if r["summary"] == "none"}
    lines = [f"Attention fidelity, {model}, {card}, window {args.window_size}, {args.decode_tokens} decode queries "
             f"(relative L2 error of the attention output against full attention; lower is better)", "",
             "| prompt | budget | method | summary (state share) | memory/layer | last query | vs evict | decode | "
             "vs evict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['length']} | {r['budget']} | {r['method']} | {r['summary']} | does not fit | | | | |")
            continue
        base = evict.get((r["length"], r["budget"], r["method"]))
        ratio_last = f"{r['last'] / base['last']:.2f}" if base else ""
        ratio_decode = f"{r['decode'] / base['decode']:.2f}" if base else ""
        lines.append(f"| {r['length']} | {r['budget']} | {r['method']} | {r['summary']} | {r['memory']:.1f} | "
                     f"{r['last']:.3f} | {ratio_last} | {r['decode']:.3f} | {ratio_decode} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
