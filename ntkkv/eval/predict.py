"""Answering a task's samples in batches and appending each answer to its prediction file, resumably.

The loop the LongBench and RULER runners share: skip the samples a file (or its data-parallel
parts) already holds, build the prompts of the rest, answer them longest first in left-padded
batches (a fixed size, or as many as fit the GPU's memory), and append one record a sample with
its prediction, the K/V each layer kept and the time it took.
"""
import logging
import time

import torch
from tqdm import tqdm

from ntkkv.eval.batching import BatchSizer
from ntkkv.eval.jsonl import JsonlAppender, part_path, read_predictions

logger = logging.getLogger(__name__)


def append_predictions(model, tokenizer, examples, prepare, output_path, settings, max_new_tokens, stop_ids,
                       generate_batch, shard, on_bad_line="stop", desc=""):
    """Append predictions for this shard's examples whose `_id` is not yet in `output_path` (or its parts).

    prepare(pending examples) -> [(record to write, prompt token ids)], one pair per example.
    generate_batch(model, tokenizer, batch_ids, settings, max_new_tokens, stop_ids) -> (predictions,
    answer token counts, kept K/V per layer, summary memory per layer, decode path), per sample.
    Returns the mean kept K/V entries per layer of each sample written.
    """
    done_ids = {record.get("_id") for record in read_predictions(output_path, on_bad_line)}
    pending = [example for example in shard.take(examples) if example["_id"] not in done_ids]
    shard_size = len(shard.take(examples))
    items = prepare(pending)
    # longest first: batches of similar lengths pad little, and memory errors show at once
    items.sort(key=lambda item: -len(item[1]))
    target = output_path if shard.world_size == 1 else part_path(output_path, shard.rank)
    kept_means = []
    progress = tqdm(total=shard_size, initial=shard_size - len(pending), desc=desc, unit="sample",
                    position=shard.rank, dynamic_ncols=True)
    sizer = BatchSizer(settings.eval_batch_size, device=model.get_input_embeddings().weight.device)
    lengths = [len(ids) for _, ids in items]
    with JsonlAppender(target) as writer, progress:
        start = 0
        while start < len(items):
            size = sizer.next_size(lengths[start:])
            batch = items[start : start + size]
            batch_ids = [ids for _, ids in batch]
            started = time.perf_counter()
            sizer.start()
            try:
                predictions, answer_lengths, kv_kept, state_tokens, decode = generate_batch(
                    model, tokenizer, batch_ids, settings, max_new_tokens, stop_ids
                )
            except torch.cuda.OutOfMemoryError:
                sizer.out_of_memory(size)  # re-raises unless a smaller batch can be tried
                logger.info("%d samples did not fit in memory: trying fewer", size)
                continue
            sizer.done(size, max(len(ids) for ids in batch_ids))
            seconds = (time.perf_counter() - started) / len(batch)
            for (record, ids), prediction, answer_length, kept, state in zip(
                batch, predictions, answer_lengths, kv_kept, state_tokens
            ):
                kept = [int(entries) for entries in kept]
                # kv_state: memory (token equivalents) of merged slots and summary state standing for evicted tokens
                writer.write({**record, "pred": prediction, "prompt_tokens": len(ids), "answer_tokens": answer_length,
                              "kv_kept": kept, "kv_state": [round(float(n), 3) for n in state],
                              "seconds": round(seconds, 3), "batch_size": len(batch), "decode": decode})
                kept_means.append(sum(kept) / max(len(kept), 1))
            progress.update(len(batch))
            start += size
    return kept_means
