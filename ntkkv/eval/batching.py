"""Left-padded batches: every sequence right-aligned, so that the last column is each prompt's end."""

from __future__ import annotations

import torch


def left_pad(sequences, pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, padded on the left to the longest."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


AUTO = "auto"
MAX_AUTO_BATCH = 128  # the most samples an automatic batch takes
CPU_AUTO_BATCH = 4  # "auto" off the GPU, where memory does not bound the batch
MEMORY_SHARE = 0.9  # of the memory beside the weights that an automatic batch may plan to use


def batch_size_setting(text):
    """--eval_batch_size: a positive integer or "auto"."""
    if str(text).lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--eval_batch_size must be a positive integer or 'auto', got {text!r}")
    return value


class CudaMemory:
    """The CUDA memory counters a `BatchSizer` reads (a stand-in replaces them in tests)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def in_use(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def capacity(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def release(self) -> None:
        torch.cuda.empty_cache()


class BatchSizer:
    """How many samples the next batch takes: a fixed number, or "auto": on a GPU the most that fit its
    memory. Auto starts with one sample, learns the bytes a batch needs per (sample × padded prompt
    token) from the peak memory of each batch run, sizes the next batch by its own longest prompt, and
    halves on out-of-memory. Samples should come longest first, so that a batch's longest is its first."""

    def __init__(self, setting, device=None, memory=None):
        self.auto = setting == AUTO
        on_gpu = device is not None and torch.device(device).type == "cuda"
        self.memory = memory if memory is not None else (CudaMemory(device) if self.auto and on_gpu else None)
        self.size = (1 if self.memory is not None else CPU_AUTO_BATCH) if self.auto else int(setting)
        self.bytes_per_token = None
        self.resident = None
        self.cap = MAX_AUTO_BATCH  # lowered by an out-of-memory error, until a batch has run

    def next_size(self, lengths) -> int:
        """The size of the next batch, for the pending samples' prompt lengths (in order)."""
        if self.memory is None or self.bytes_per_token is None:
            return max(1, min(self.size, len(lengths)))
        room = MEMORY_SHARE * (self.memory.capacity() - self.resident)
        size = int(room // (self.bytes_per_token * max(lengths[0], 1)))
        return max(1, min(size, self.cap, len(lengths)))

    def start(self) -> None:
        if self.memory is not None:
            self.memory.reset_peak()
            self.resident = self.memory.in_use() if self.resident is None else self.resident

    def done(self, batch_size: int, longest: int) -> None:
        """After a batch of `batch_size` samples padded to `longest` tokens ran: learn its memory."""
        if self.memory is not None:
            per_token = (self.memory.peak() - self.resident) / max(batch_size * longest, 1)
            self.bytes_per_token = max(per_token, self.bytes_per_token or 0.0)
            self.size = batch_size
            self.cap = MAX_AUTO_BATCH

    def out_of_memory(self, batch_size: int) -> None:
        """A batch of `batch_size` did not fit: the next is half as large (raises at one sample)."""
        if not self.auto or batch_size <= 1:
            raise  # the error being handled: nothing smaller to try
        if self.memory is not None:
            self.memory.release()
        self.size = self.cap = max(1, batch_size // 2)
