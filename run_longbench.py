"""Generate LongBench predictions with a compressed KV cache (PyramidKV's flags and file layout).

    python run_longbench.py --method SnapKV --model_path smollm2 --max_capacity_prompts 128 \
        --datasets multi_news --max_num_examples 20

Several GPUs, one process each: torchrun --nproc_per_node 4 run_longbench.py ...
"""
import argparse
import logging
import os
import sys
import time

import torch

from ntkkv.eval import longbench
from ntkkv.eval.jsonl import read_jsonl
from ntkkv.eval.longbench_run import (
    Shard,
    budget_label,
    end_of_run,
    init_distributed,
    prediction_path,
    run_dataset,
)
from ntkkv.eval.options import (
    add_generation_arguments,
    add_model_arguments,
    compression_options,
    default_device_map,
    default_model_name,
    run_label,
    set_seed,
    settings_from_args,
)
from ntkkv.models import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "results_longbench")
    parser.add_argument("--data_dir", default="data/LongBench", help="folder of LongBench .jsonl files")
    parser.add_argument("--download", action="store_true", help="fetch LongBench from the Hugging Face hub if missing")
    parser.add_argument("--datasets", help="comma list (default: the 16 English tasks; LongBench-E's 13 with -e)")
    parser.add_argument("--longbench_e", action="store_true", help="use the *_e.jsonl files (LongBench-E)")
    parser.add_argument("--max_num_examples", type=int, help="at most this many samples per task")
    parser.add_argument("--sample_method", default="topk", choices=["topk", "random"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_new_tokens", type=int, help="default: LongBench's limit for each task")
    parser.add_argument("--max_length", type=int,
                        help="longest prompt in tokens, chat template included (default: context minus new tokens)")
    parser.add_argument("--no_chat_template", action="store_true", help="feed raw prompts to every task")
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def load_tasks(args):
    """{dataset: examples} for every requested task, all checked before any model is loaded."""
    default = longbench.LONGBENCH_E_DATASETS if args.longbench_e else longbench.ENGLISH_DATASETS
    datasets = [name.strip() for name in args.datasets.split(",")] if args.datasets else list(default)
    longbench.check_dataset_names(datasets)
    if args.download and not os.path.isdir(args.data_dir):
        longbench.download_longbench(args.data_dir)
    tasks = {}
    for dataset in datasets:
        path = longbench.dataset_file(args.data_dir, dataset, args.longbench_e)
        examples = read_jsonl(path, args.on_bad_line)
        longbench.check_example_keys(examples, path)
        tasks[dataset] = longbench.select_examples(examples, args.max_num_examples, args.sample_method, args.seed)
    return tasks


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    shard = Shard.from_environment()
    try:
        # every setting is checked, then against the model's config, before the data and the weights load
        settings, _ = settings_from_args(args, max_new_tokens=args.max_new_tokens, max_length=args.max_length)
        tasks = load_tasks(args)
        model, tokenizer = load_model(
            args.model_path, dtype=args.dtype, device_map=args.device_map or default_device_map(shard),
            attn_implementation=args.attn_implementation,
        )
    except (ImportError, OSError, ValueError) as error:
        sys.exit(f"run_longbench.py: error: {error}")
    label = budget_label(args.max_capacity_prompts, args.max_capacity_prompts_ratio)
    model_name = args.model_name or default_model_name(args.model_path)
    init_distributed(shard)
    started, kept_means, output_paths = time.perf_counter(), [], []
    with torch.inference_mode():
        for dataset, examples in tasks.items():
            output_path = prediction_path(args.save_dir, model_name, label, dataset,
                                          run_label(args.method, compression_options(args)), args.longbench_e)
            output_paths.append(output_path)
            kept_means += run_dataset(
                model, tokenizer, dataset, examples, output_path, settings, shard, args.on_bad_line
            )
    print(end_of_run(output_paths, shard, args.on_bad_line, args.method, label,
                     os.path.join(args.save_dir, f"{model_name}_{label}"), kept_means, started,
                     f"over {len(tasks)} tasks"))


if __name__ == "__main__":
    main()
