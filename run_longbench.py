"""Generate LongBench predictions with a compressed KV cache (PyramidKV's flags and file layout).

    python run_longbench.py --method SnapKV --model_path smollm2 --max_capacity_prompts 128 \
        --datasets multi_news --max_num_examples 20

Several GPUs, one process each: torchrun --nproc_per_node 4 run_longbench.py ...
"""
import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from ntkkv.eval import longbench
from ntkkv.eval.batching import batch_size_setting
from ntkkv.eval.jsonl import BAD_LINE_POLICIES, read_jsonl
from ntkkv.eval.longbench_run import (
    GenerationSettings,
    Shard,
    budget_label,
    finish,
    init_distributed,
    prediction_path,
    run_dataset,
)
from ntkkv.eval.options import (
    add_budget_argument,
    add_compression_arguments,
    check_run,
    compression_options,
    run_label,
    true_or_false,
)
from ntkkv.generation import DECODE_MODES
from ntkkv.models import load_config, load_model
from ntkkv.policies import METHODS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)} (any case)")
    parser.add_argument("--model_path", required=True, help="HF folder or hub id, a .gguf file, or 'smollm2'")
    parser.add_argument("--model_name", help="results folder prefix (default: the path's last part, lower case)")
    add_budget_argument(parser, 512, "memory per layer and KV head in token equivalents: K/V entries kept, "
                                     "plus the summary's share with --summary (-1: use the ratio)")
    parser.add_argument("--max_capacity_prompts_ratio", type=float, default=-1,
                        help="budget as a share of each sample's prompt length (with --max_capacity_prompts -1)")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["flash_attention_2", "sdpa", "eager"])
    parser.add_argument("--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's); default: "
                        "bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device_map", help="default: auto with one process, this process's GPU with several")
    parser.add_argument("--save_dir", default="results_longbench")
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
    parser.add_argument("--eval_batch_size", type=batch_size_argument, default=1,
                        help="samples per batch, or auto: the most that fit the GPU's memory, longest prompts first")
    parser.add_argument("--use_cache", type=true_or_false, default=True)
    parser.add_argument("--decode", default="auto", choices=DECODE_MODES,
                        help="auto: the static cache with CUDA-graph decode on a GPU (dynamic on the CPU); static; "
                             "dynamic: model.generate over the compressed cache (the reference)")
    add_compression_arguments(parser)
    parser.add_argument("--on_bad_line", default="stop", choices=BAD_LINE_POLICIES,
                        help="what a malformed JSON line in a data or prediction file does")
    return parser.parse_args(argv)


def batch_size_argument(text):
    try:
        return batch_size_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_model_name(model_path):
    name = os.path.basename(model_path.rstrip("/"))
    return (name[: -len(".gguf")] if name.endswith(".gguf") else name).lower()


def default_device_map(shard):
    if not torch.cuda.is_available():
        return None
    return {"": shard.local_rank} if shard.world_size > 1 else "auto"


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
        settings = GenerationSettings(
            method=args.method, max_capacity_prompts=args.max_capacity_prompts,
            max_capacity_prompts_ratio=args.max_capacity_prompts_ratio, eval_batch_size=args.eval_batch_size,
            max_new_tokens=args.max_new_tokens, max_length=args.max_length,
            chat_template=not args.no_chat_template, use_cache=args.use_cache, decode=args.decode,
            compress_kwargs=compression_options(args),
        )
        ratio = settings.budget_options().get("max_capacity_prompt_ratio")  # refuses neither budget flag set
        if ratio is not None and args.eval_batch_size != 1 and compression_options(args).get("summary"):
            raise ValueError("--max_capacity_prompts_ratio with a --summary needs --eval_batch_size 1 (each sample "
                             "of a batch gets its own budget, and the summary's clusters must agree)")
        # every setting is checked, then against the model's config, before the data and the weights load
        check_run([args.method], [args.max_capacity_prompts], compression_options(args), None, ratio)
        config = load_config(args.model_path)
        check_run([args.method], [args.max_capacity_prompts], compression_options(args), config, ratio)
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
    finish(output_paths, shard, args.on_bad_line)
    rank_note = f"[rank {shard.rank}/{shard.world_size}] " if shard.world_size > 1 else ""
    mean_kept = f"{sum(kept_means) / len(kept_means):.1f}" if kept_means else "n/a"
    print(f"{rank_note}{args.method} budget {label}: {len(kept_means)} new samples over {len(tasks)} tasks in "
          f"{(time.perf_counter() - started) / 60:.1f} min, mean kept K/V per layer {mean_kept} "
          f"-> {os.path.join(args.save_dir, f'{model_name}_{label}')}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
