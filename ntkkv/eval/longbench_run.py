"""Generating LongBench predictions: resumable, batched, and shardable over processes.

One process per GPU (launched by torchrun or accelerate) takes every WORLD_SIZE-th
sample from RANK on and appends to its own part file; at the end rank 0 merges the
parts into the prediction file where PyramidKV puts it:
save_dir/{model_name}_{max_capacity_prompts}/{dataset}/{method}.json.
"""
import dataclasses
import datetime
import logging
import os
import time

import torch

from ntkkv.eval import longbench
from ntkkv.eval.batching import left_pad
from ntkkv.eval.jsonl import merge_parts
from ntkkv.eval.predict import append_predictions
from ntkkv.generation import generate
from ntkkv.patch import compress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel processes (torchrun/accelerate env vars)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls):
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def take(self, examples):
        return examples[self.rank :: self.world_size]


@dataclasses.dataclass
class GenerationSettings:
    """How each prompt is compressed and answered."""

    method: str
    max_capacity_prompts: int = 512
    """Memory per layer and KV head in token equivalents; -1 to use max_capacity_prompts_ratio instead."""
    max_capacity_prompts_ratio: float = -1
    """Budget as a share of each sample's own prompt length, when max_capacity_prompts is -1."""
    eval_batch_size: int | str = 1
    """Samples per batch, or "auto": the most that fit the GPU's memory (`ntkkv.eval.batching.BatchSizer`)."""
    max_new_tokens: int = None
    """None: LongBench's limit for the task."""
    max_length: int = None
    """Longest model input in tokens (chat template included); None: the model's context minus max_new_tokens."""
    chat_template: bool = True
    use_cache: bool = True
    decode: str = "auto"
    """ntkkv.generate's decode path: "auto" (static with CUDA graphs on a GPU), "static" or "dynamic"."""
    compress_kwargs: dict = dataclasses.field(default_factory=dict)
    """Passed on to ntkkv.compress (window_size, kernel_size, pooling, gqa_reduce, summary...)."""

    def budget_options(self) -> dict:
        """The budget as ntkkv.compress takes it: max_capacity_prompt, or the ratio applied per sample."""
        if self.max_capacity_prompts != -1:
            return {"max_capacity_prompt": self.max_capacity_prompts}
        if self.max_capacity_prompts_ratio != -1:
            return {"max_capacity_prompt_ratio": self.max_capacity_prompts_ratio}
        raise ValueError("max_capacity_prompts is -1 and max_capacity_prompts_ratio is unset: set one of them")


def budget_label(max_capacity_prompts, max_capacity_prompts_ratio=-1):
    """The budget part of the results folder name: the budget, or ratio{r} for ratio budgets."""
    if max_capacity_prompts == -1 and max_capacity_prompts_ratio != -1:
        return f"ratio{max_capacity_prompts_ratio}"
    return str(max_capacity_prompts)


def prediction_path(save_dir, model_name, label, dataset, method, longbench_e=False):
    folder = f"{dataset}_e" if longbench_e else dataset
    return os.path.join(save_dir, f"{model_name}_{label}", folder, f"{method}.json")


def cut_at_stop(token_ids, stop_ids):
    for position, token_id in enumerate(token_ids):
        if token_id in stop_ids:
            return list(token_ids[:position])
    return list(token_ids)


def stop_ids_for(dataset, tokenizer, model):
    stop_ids = longbench.stop_token_ids(tokenizer, model)
    if dataset == "samsum":
        # LongBench stops samsum at the first newline: its answers are one line
        stop_ids.append(tokenizer("\n", add_special_tokens=False)["input_ids"][-1])
    return sorted(set(stop_ids))


def generate_batch(model, tokenizer, batch_ids, settings, max_new_tokens, stop_ids):
    """Predictions, their token counts (stop token excluded) and kept K/V lengths per layer, per sample."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = left_pad(batch_ids, pad_token_id, device)
    with compress(model, settings.method, **settings.budget_options(), **settings.compress_kwargs):
        output = generate(
            model, input_ids, attention_mask, decode=settings.decode if settings.use_cache else "dynamic",
            max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False, num_beams=1,
            eos_token_id=stop_ids, pad_token_id=pad_token_id, use_cache=settings.use_cache, tokenizer=tokenizer,
        )
    answers = [cut_at_stop(new_tokens, stop_ids) for new_tokens in output.new_tokens]
    predictions = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
    return predictions, [len(answer) for answer in answers], output.kv_kept, output.state_tokens, output.decode


def run_dataset(model, tokenizer, dataset, examples, output_path, settings, shard=Shard(), on_bad_line="stop"):
    """Append predictions for this shard's samples not yet in `output_path` (or its parts).

    Returns the mean kept K/V entries per layer of each sample written.
    """
    max_new_tokens = settings.max_new_tokens or longbench.DATASET_MAX_NEW_TOKENS[dataset]
    max_prompt_tokens = longbench.max_prompt_length(model, max_new_tokens, settings.max_length)
    chat = longbench.uses_chat_template(dataset, tokenizer, settings.chat_template)

    def prepare(pending):
        return [(example, longbench.build_prompt_ids(tokenizer, longbench.format_prompt(dataset, example),
                                                      max_prompt_tokens, chat))
                for example in pending]

    # generate_batch is looked up here, at each call, so that it can be replaced (tests interrupt it)
    return append_predictions(model, tokenizer, examples, prepare, output_path, settings, max_new_tokens,
                              stop_ids_for(dataset, tokenizer, model), generate_batch, shard, on_bad_line,
                              desc=f"{dataset} {settings.method}")


def init_distributed(shard):
    """Join the process group (CPU 'gloo', used only for the final barrier) when launched with several ranks."""
    if shard.world_size > 1 and not torch.distributed.is_initialized():
        # ranks finish their shards at different times: wait long at the barrier
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=2))


def finish(output_paths, shard, on_bad_line="stop"):
    """After every rank is done, rank 0 merges the part files into the prediction files."""
    if shard.world_size > 1:
        torch.distributed.barrier()
    if shard.rank == 0:
        for path in output_paths:
            merged = merge_parts(path, on_bad_line)
            if merged is not None:
                logger.info("merged the parts of %s (%d samples)", path, merged)
    if shard.world_size > 1:
        torch.distributed.barrier()


def end_of_run(output_paths, shard, on_bad_line, method, label, folder, kept_means, started, what) -> str:
    """Merge the ranks' parts, leave the process group, and return the run's one-line summary (`what`:
    e.g. "over 3 tasks")."""
    finish(output_paths, shard, on_bad_line)
    rank_note = f"[rank {shard.rank}/{shard.world_size}] " if shard.world_size > 1 else ""
    mean_kept = f"{sum(kept_means) / len(kept_means):.1f}" if kept_means else "n/a"
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return (f"{rank_note}{method} budget {label}: {len(kept_means)} new samples {what} in "
            f"{(time.perf_counter() - started) / 60:.1f} min, mean kept K/V per layer {mean_kept} -> {folder}")
