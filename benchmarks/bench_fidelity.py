"""Attention fidelity of each method × summary at equal memory, on a model's real activations.

    python benchmarks/bench_fidelity.py --device cuda --out docs/bench_fidelity.md    # SmolLM2, 2k and 6k
    python benchmarks/bench_fidelity.py --summaries none merge taylor2_lowrank --state_budgets 0.25
    python benchmarks/bench_fidelity.py --methods snapkv kvzip --summaries none merge fitted
    python benchmarks/bench_fidelity.py --summaries none merge merge:route --state_budgets 0.125  # routed spikes
    python benchmarks/bench_fidelity.py --summaries none fitted learned:route learned:route:fit --state_budgets 0.125 \
        --summary_path assets/smollm2_learned_f2_route.pt                                # the kept slots fitted beside
    python benchmarks/bench_fidelity.py --tiny --device cpu                          # smoke test, seconds

The prompt is the needle test's (the essays, the needle at 50% depth, the question, the chat
template) at each --lengths; the unpatched model then answers it greedily for --decode_tokens
tokens, and one forward pass over prompt + answer records every layer's queries, keys and values.
KVzip's reconstruction pass (`ntkkv.reconstruction`) is recorded the same way: for each chunk of
--chunk_size tokens, one forward over the prompt followed by the chunk's read (the request to repeat
the context, then the chunk itself). For each configuration every layer compresses the prompt's keys
and values exactly as the patched attention does at the prefill (`Compressor.compress_layer`; kvzip
and pyramid_kvzip with the pass's scores, `read_scores`, and a refitting summary under them fitted
to the pass's queries at up to REFERENCE_POSITIONS read positions, as the library does), and reads
them through the same merge as at decode (`merged_attention`). The query sets (--query_sets):
  last            the prompt's last query, over the compressed prompt;
  decode          the answer's queries, over the compressed prompt plus the answer's own keys (exact);
  reconstruction  the reconstruction reads' queries at up to --reconstruction_positions positions of
                  the copies, evenly spread over the context, over the compressed prompt plus the read's
                  own keys (exact, causal): a reconstruction read is a decode of the request and the copy,
                  so it sees what an answer would see. The positions the refitting summary fits to are
                  left out, so its error is held out. This set needs no question: it measures how much
                  of the whole context the compressed prompt still serves (KVzip's criterion).
Error = ‖o − o_full‖ / ‖o_full‖ per layer, query head and query, averaged; o_full is full
attention, read through the same path with the prompt kept whole. Memory is per layer and KV head
in token equivalents (exact tokens + state); every row of a budget spends the same memory, except
"exact" (the exact-exp kernel: a ceiling that keeps every token). "vs evict" divides by the same
method's plain eviction at that budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ntkkv.cache import CompressedLayer
from ntkkv.compressor import Compressor
from ntkkv.forward import merged_attention
from ntkkv.models import load_model, model_shape
from ntkkv.patch import build_compressor
from ntkkv.plan import check_compression
from ntkkv.policies import KVzip
from ntkkv.reconstruction import REFERENCE_POSITIONS, read_scores, reconstruction_prompt
from ntkkv.summaries import Exact, refits_kept
from ntkkv.training import capture_attention

QUERY_SETS = ("last", "decode", "reconstruction")
SET_LABELS = {"last": "last query", "decode": "decode", "reconstruction": "reconstruction"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144], help="prompt lengths in tokens")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv"],
                        help="policies; kvzip and pyramid_kvzip take their scores from the reconstruction pass")
    parser.add_argument("--summaries", "--kernels", dest="summaries", nargs="+",
                        default=["none", "merge", "merge:position", "taylor1", "taylor2_diag", "taylor2_lowrank",
                                 "seed_taylor", "fitted", "exact"],
                        help="summary names; 'NAME:position' clusters by position, 'NAME:route' routes the spikes "
                             "to singleton clusters, 'NAME:fit' fits the kept slots beside the state (fit_kept; "
                             "combined: 'NAME:position:route:fit'); 'learned' needs --summary_path")
    parser.add_argument("--state_budgets", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--rank", type=int, default=None, help="taylor2_lowrank's rank")
    parser.add_argument("--summary_path", "--kernel_path", dest="summary_path", default=None)
    parser.add_argument("--window_size", type=int, default=8)
    parser.add_argument("--query_sets", nargs="+", choices=QUERY_SETS, default=list(QUERY_SETS),
                        help="which queries read the compressed prompt (see above)")
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--reconstruction_positions", type=int, default=REFERENCE_POSITIONS,
                        help="reconstruction queries measured per layer (the most; spread over the context)")
    parser.add_argument("--chunk_size", type=int, default=KVzip.chunk_size,
                        help="context tokens per reconstruction read (KVzip's chunk_size)")
    parser.add_argument("--depth", type=float, default=50.0, help="needle depth in percent")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model and random tokens, its request in bytes (smoke test)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here, and the rows as .json")
    return parser.parse_args(argv)


def configurations(args):
    """(method, summary label, compress kwargs) for every row, eviction first."""
    rows = []
    for method in args.methods:
        for entry in args.summaries:
            name, *tags = entry.split(":")
            route, fit = "route" in tags, "fit" in tags
            cluster_by = next((tag for tag in tags if tag not in ("route", "fit")), None)
            if fit and (name in ("none", "exact") or refits_kept(name)):
                raise ValueError(f"{entry!r}: the tag 'fit' fits the kept slots beside a cluster summary's state; "
                                 f"{name!r} has none (use 'fitted' for eviction + fit)")
            if name in ("none", "exact"):
                rows.append((method, name, {"summary": Exact() if name == "exact" else None}))
                continue
            if refits_kept(name):  # fitted, cam: they rewrite the kept slots, no state share to sweep
                rows.append((method, name, {"summary": name, **({"route": True} if route else {})}))
                continue
            for state_budget in args.state_budgets:
                options = {"summary": name, "state_budget": state_budget}
                if cluster_by:
                    options["cluster_by"] = cluster_by
                if route:
                    options["route"] = True
                if fit:
                    options["fit_kept"] = True
                if name == "taylor2_lowrank" and args.rank:
                    options["rank"] = args.rank
                if name == "learned":
                    options["summary_path"] = args.summary_path
                rows.append((method, f"{entry} {state_budget:g}", options))
    return rows


def check_args(args, rows):
    """Every bad flag raises a ValueError before the model loads. Returns the policy that words and chunks the
    reconstruction pass, or None when neither a method nor a query set needs the pass."""
    compressors = [build_compressor(method, max(args.budgets), window_size=args.window_size, **options)
                   for method, _, options in rows]
    if "decode" in args.query_sets and args.decode_tokens < 1:
        raise ValueError(f"decode_tokens must be ≥ 1 for the decode query set, got {args.decode_tokens}")
    if "reconstruction" in args.query_sets and args.reconstruction_positions < 1:
        raise ValueError(f"reconstruction_positions must be ≥ 1, got {args.reconstruction_positions}")
    pass_policy = KVzip(max(args.budgets), window_size=args.window_size, chunk_size=args.chunk_size)
    needed = "reconstruction" in args.query_sets or any(isinstance(getattr(compressor, "policy", None), KVzip)
                                                          for compressor in compressors)
    return pass_policy if needed else None


class ByteTokenizer:
    """The tiny model's tokenizer: a text's UTF-8 bytes are its token ids (the tiny vocabulary is 256). It has
    no chat template, so the reconstruction request is worded in the "plain" family."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def needle_prompt(model, tokenizer, length, depth, decode_tokens, device):
    """Prompt ids of the needle test at `length` tokens, and the unpatched model's greedy answer."""
    from ntkkv.eval import needle

    haystack = needle.Haystack(tokenizer)
    context, _ = haystack.context(length, depth)
    prompt = needle.build_prompt(tokenizer, context, needle.DEFAULT_RETRIEVAL_QUESTION)
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    if decode_tokens == 0:
        return prompt_ids, prompt_ids[:, :0]
    answer = model.generate(prompt_ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
    return answer[:, : prompt_ids.shape[1]], answer[:, prompt_ids.shape[1] :]


@dataclass
class Read:
    """Queries of one layer that read the compressed prompt followed by their own tokens.

    queries: (1, heads, m, d), causal among the last m slots (m = 1 and no tokens: a prompt query, which
        sees the whole prompt).
    keys, values: (1, kv_heads, tokens, d), the tokens after the prompt that the queries also see, kept exact.
    rows: which of the m queries are measured (None: all).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor | None = None


@dataclass
class ReconstructionPass:
    """What is kept of KVzip's reconstruction pass over one prompt, per layer.

    scores: (1, kv_heads, n) float32, `SelectionInputs.scores` (0 at the sinks).
    references: (1, kv_heads, group × count, d), the refitting summary's reference queries.
    reads: one `Read` per chunk with measured positions, cut after its last one.
    """

    scores: list[torch.Tensor]
    references: list[torch.Tensor]
    reads: list[list[Read]]


def reference_positions(total: int) -> list[int]:
    """The read positions (over all chunks' inputs, in order) whose queries a refitting summary fits to,
    as `Reconstruction` picks them: up to REFERENCE_POSITIONS, evenly spread."""
    count = min(REFERENCE_POSITIONS, total)
    return (torch.arange(count) * total // count).tolist() if count else []


def measured_positions(inputs, count: int, left_out: set[int]) -> list[int]:
    """Up to `count` read positions (over all chunks' inputs) of copied context tokens, evenly spread over those
    not in `left_out` (the reference positions); over all copies if every one is left out (reads no longer than
    REFERENCE_POSITIONS: the refitting summary then fits to every read query)."""
    copies, offset = [], 0
    for start, stop, ids in inputs:  # a chunk's input ends with its copy of context[start:stop]
        copies.extend(range(offset + len(ids) - (stop - start), offset + len(ids)))
        offset += len(ids)
    held_out = [position for position in copies if position not in left_out] or copies
    count = min(count, len(held_out))
    return [held_out[index] for index in (torch.arange(count) * len(held_out) // count).tolist()] if count else []


@torch.no_grad()
def reconstruction_pass(model, tokenizer, prompt_ids, policy: KVzip, positions: int) -> ReconstructionPass:
    """KVzip's pass over `prompt_ids` (1, n): each chunk's read recorded by one forward over the prompt and
    the read, its scores (`read_scores`), its reference queries, and `positions` measured queries."""
    context = prompt_ids[0].tolist()
    n, sinks = len(context), min(policy.sinks, len(context))
    inputs = reconstruction_prompt(tokenizer).chunk_inputs(context, sinks, policy.chunk_size)
    total = sum(len(ids) for _, _, ids in inputs)
    references = reference_positions(total)
    measured = measured_positions(inputs, positions, set(references))
    scores, chunk_references, reads = None, None, None
    offset = 0
    for start, stop, ids in inputs:
        activations = capture_attention(model, torch.cat([prompt_ids, torch.tensor([ids]).to(prompt_ids)], dim=1))
        if scores is None:
            scores = [layer.keys.new_zeros(layer.keys.shape[:2] + (n,)) for layer in activations]
            chunk_references, reads = [[] for _ in activations], [[] for _ in activations]
        picked, rows = (torch.tensor([p - offset for p in chosen if offset <= p < offset + len(ids)],
                                     dtype=torch.long, device=prompt_ids.device) for chosen in (references, measured))
        for layer_idx, layer in enumerate(activations):
            queries, keys, values = layer.queries[:, :, n:], layer.keys, layer.values  # the read's, the keys' all
            scores[layer_idx][..., start:stop] = read_scores(queries, keys, start, stop, policy.sinks, layer.scaling,
                                                             policy.query_block)
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
            grouped = queries.reshape(1, kv_heads, -1, len(ids), head_dim)[:, :, :, picked]
            chunk_references[layer_idx].append(grouped.reshape(1, kv_heads, -1, head_dim))
            if len(rows):
                end = int(rows[-1]) + 1  # later queries are not measured
                reads[layer_idx].append(Read(queries[:, :, :end].clone(), keys[:, :, n: n + end].clone(),
                                             values[:, :, n: n + end].clone(), rows))
        offset += len(ids)
    return ReconstructionPass(scores, [torch.cat(chunks, dim=2) for chunks in chunk_references], reads)


def layer_reads(activations, prompt_length, query_sets, reconstruction) -> list[dict[str, list[Read]]]:
    """Per layer, each query set's reads."""
    n = prompt_length
    reads = []
    for layer_idx, layer in enumerate(activations):
        sets = {"last": [Read(layer.queries[:, :, n - 1 : n], layer.keys[:, :, n:n], layer.values[:, :, n:n])],
                "decode": [Read(layer.queries[:, :, n:], layer.keys[:, :, n:], layer.values[:, :, n:])],
                "reconstruction": reconstruction.reads[layer_idx] if reconstruction else []}
        reads.append({name: sets[name] for name in query_sets})
    return reads


def read_outputs(compressed, prompt_length, reads: list[Read], scaling) -> torch.Tensor:
    """(1, kv_heads, group, measured queries, d) float32: the reads' outputs over the compressed prompt."""
    layer, outputs = CompressedLayer(), []
    for read in reads:
        layer.store(compressed, prompt_length)
        layer.update(read.keys, read.values)
        batch, heads, m, head_dim = read.queries.shape
        kv_heads = read.keys.shape[1]
        grouped = read.queries.reshape(batch, kv_heads, heads // kv_heads * m, head_dim)
        output = merged_attention(grouped, *layer.attention_inputs(), layer.state, scaling, m)
        output = output.view(batch, kv_heads, heads // kv_heads, m, head_dim)
        outputs.append(output if read.rows is None else output[:, :, :, read.rows])
    return torch.cat(outputs, dim=3)


def compressed_outputs(compressor, activations, prompt_length, reads, reconstruction):
    """Per layer, each query set's outputs over the compressed prompt, as the patched attention reads; and the
    memory per layer. KVzip's policies compress with the reconstruction pass's scores and reference queries."""
    outputs, memory = [], []
    kvzip = isinstance(compressor.policy, KVzip)
    for layer_idx, layer in enumerate(activations):
        prompt = slice(0, prompt_length)
        valid = torch.ones(1, prompt_length, dtype=torch.bool, device=layer.keys.device)
        pass_inputs = {"scores": reconstruction.scores[layer_idx],
                       "reference_queries": reconstruction.references[layer_idx]} if kvzip else {}
        compressed = compressor.compress_layer(layer.queries[:, :, prompt], layer.keys[:, :, prompt],
                                               layer.values[:, :, prompt], valid, layer_idx, len(activations),
                                               layer.scaling, **pass_inputs)
        cache_layer = CompressedLayer()
        cache_layer.store(compressed, prompt_length)
        memory.append(cache_layer.real_slots_per_sample()[0] + cache_layer.state_tokens())
        outputs.append({name: read_outputs(compressed, prompt_length, layer_reads, layer.scaling)
                        for name, layer_reads in reads[layer_idx].items()})
    return outputs, sum(memory) / len(memory)


def relative_errors(outputs, targets) -> dict[str, float]:
    """Per query set: the relative error per layer, query head and query, averaged over them in each layer,
    then over the layers."""
    errors = {}
    for name in targets[0]:
        per_layer = [((output[name] - target[name]).norm(dim=-1) / target[name].norm(dim=-1).clamp_min(1e-12)).mean()
                     for output, target in zip(outputs, targets)]
        errors[name] = float(torch.stack(per_layer).mean())
    return errors


def load(args, device):
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device).eval(), ByteTokenizer()
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return load_model(args.model_name, dtype=dtype, device_map=device)


def prompt_and_answer(args, model, tokenizer, length, device):
    """The prompt's ids and the answer's (none without the decode query set)."""
    decode_tokens = args.decode_tokens if "decode" in args.query_sets else 0
    if not args.tiny:
        return needle_prompt(model, tokenizer, length, args.depth, decode_tokens, device)
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 256, (1, length + decode_tokens), generator=generator).to(device)
    return ids[:, :length], ids[:, length:]


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a bad summary name or flag fails before the model loads, in one line
        rows = configurations(args)
        pass_policy = check_args(args, rows)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"bench_fidelity.py: error: {error}") from None
    model, tokenizer = load(args, device)
    shape = model_shape(model)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    results = []
    for length in args.lengths:
        prompt_ids, answer_ids = prompt_and_answer(args, model, tokenizer, length, device)
        n = prompt_ids.shape[1]
        activations = capture_attention(model, torch.cat([prompt_ids, answer_ids], dim=1))
        positions = args.reconstruction_positions if "reconstruction" in args.query_sets else 0
        reconstruction = None if pass_policy is None else reconstruction_pass(model, tokenizer, prompt_ids,
                                                                              pass_policy, positions)
        reads = layer_reads(activations, n, args.query_sets, reconstruction)
        targets, _ = compressed_outputs(Compressor(None), activations, n, reads, reconstruction)  # full attention
        for budget in args.budgets:
            for method, label, options in rows:
                try:
                    compressor = build_compressor(method, budget, window_size=args.window_size, **options)
                    check_compression(compressor.policy, compressor.summary, shape)
                except ValueError as error:  # this state does not fit this budget: say so in the table
                    results.append(dict(length=n, budget=budget, method=method, summary=label,
                                        skipped=str(error).split(";")[0]))
                    continue
                started = time.perf_counter()
                outputs, memory = compressed_outputs(compressor, activations, n, reads, reconstruction)
                results.append(dict(length=n, budget=budget, method=method, summary=label, memory=memory,
                                    **relative_errors(outputs, targets), seconds=time.perf_counter() - started))
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
    sets = [name for name in QUERY_SETS if name in args.query_sets]
    measured = {"last": "the last prompt query", "decode": f"{args.decode_tokens} decode queries",
                "reconstruction": f"up to {args.reconstruction_positions} reconstruction queries "
                                  f"(chunks of {args.chunk_size})"}
    header = "".join(f" {SET_LABELS[name]} | vs evict |" for name in sets)
    lines = [f"Attention fidelity, {model}, {card}, window {args.window_size}, "
             f"{', '.join(measured[name] for name in sets)} "
             f"(relative L2 error of the attention output against full attention; lower is better)", "",
             f"| prompt | budget | method | summary (state share) | memory/layer |{header}",
             "|---|---|---|---|---|" + "---|---|" * len(sets)]
    for r in results:
        cells = f"| {r['length']} | {r['budget']} | {r['method']} | {r['summary']} |"
        if "skipped" in r:
            lines.append(cells + " does not fit |" + " | |" * len(sets))
            continue
        base = evict.get((r["length"], r["budget"], r["method"]))
        errors = "".join(f" {r[name]:.3f} | {r[name] / base[name]:.2f} |" if base else f" {r[name]:.3f} | |"
                         for name in sets)
        lines.append(f"{cells} {r['memory']:.1f} |{errors}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
