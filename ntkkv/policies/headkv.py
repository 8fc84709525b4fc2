"""HeadKV: per-head budgets from how much each head retrieves (Fu et al., 2024).

A few heads copy facts out of the context (retrieval heads); most do not. HeadKV gives every KV head a
small base share of the budget and pools the rest over all heads of all layers, in proportion to each
head's importance score, measured once per model by a needle probe (`compute_head_scores.py`; the file
for the embedded SmolLM2 ships in `assets/`). Each head then keeps its own top tokens by SnapKV's
scores. The model's total stays layers × KV heads × budget; the cache packs the heads without padding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import SelectionInputs, head_rows
from .snapkv import SnapKV

HEAD_SCORES_FORMAT = "ntkkv-head-scores/1"
DEFAULT_HEAD_SCORES = Path(__file__).resolve().parents[2] / "assets" / "smollm2_head_scores.json"


def load_head_scores(path) -> dict:
    """A head-score file (`compute_head_scores.py`'s), checked: its format, and scores of num_layers rows
    of num_heads non-negative numbers, the heads grouping into num_kv_heads. One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"head_scores: no such file {str(path)!r}; make one with compute_head_scores.py")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"head_scores: {str(path)!r} is not a readable JSON file ({error})") from None
    if not isinstance(record, dict) or record.get("format") != HEAD_SCORES_FORMAT:
        raise ValueError(f"{path} is not a head-score file (format {HEAD_SCORES_FORMAT!r})")
    scores, layers, heads = record.get("scores"), record.get("num_layers"), record.get("num_heads")
    shape_ok = (isinstance(scores, list) and len(scores) == layers
                and all(isinstance(row, list) and len(row) == heads for row in scores))
    if not shape_ok or any(not isinstance(v, (int, float)) or v < 0 for row in scores for v in row):
        raise ValueError(f"{path}: scores must be {layers} rows of {heads} non-negative numbers")
    kv_heads = record.get("num_kv_heads")
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{path}: {heads} heads do not group into num_kv_heads={kv_heads!r} KV heads")
    return record


def head_budgets(scores: torch.Tensor, kv_heads: int, per_head: int, beta: float) -> torch.Tensor:
    """Tokens each KV head keeps beyond the window, (layers, kv_heads), summing to layers · kv_heads · per_head.

    HeadKV's rule at KV-head granularity: the scores, normalised over every query head of the model, give
    each query head per_head - floor(per_head / beta) plus its share of a pool of floor(per_head / beta)
    per head; a KV head gets the mean of its query heads'. Largest remainders round to whole tokens."""
    layers, heads = scores.shape
    total = scores.sum()
    shares = scores / total if total > 0 else torch.full_like(scores, 1.0 / scores.numel())
    pooled = math.floor(per_head / beta)
    exact = (per_head - pooled) + shares * pooled * layers * heads
    exact = exact.view(layers, kv_heads, heads // kv_heads).mean(dim=-1)
    budgets = exact.floor()
    missing = layers * kv_heads * per_head - int(budgets.sum())
    order = (exact - budgets).flatten().sort(descending=True, stable=True).indices[:missing]
    budgets.view(-1)[order] += 1
    return budgets.long()


@dataclass
class HeadKV(SnapKV):
    """SnapKV's scores within each head; each KV head's budget from head importance scores.

    head_scores: path of a head-scores file (`compute_head_scores.py`); None: the shipped SmolLM2 file.
    head_beta: the pool is floor(budget / head_beta) tokens per head (KVCache-Factory's `head_beta`, 1.01: nearly all
        of the budget goes by importance); the rest is every head's base share.
    """

    head_scores: str | None = None
    head_beta: float = 1.01
    name = "headkv"
    head_wise = True

    def __post_init__(self):
        super().__post_init__()
        beta = self.head_beta
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta >= 1:
            raise ValueError(f"head_beta must be a number ≥ 1, got {beta!r}")
        path = DEFAULT_HEAD_SCORES if self.head_scores is None else self.head_scores
        record = load_head_scores(path)
        self._scores, self._kv_heads = torch.tensor(record["scores"], dtype=torch.float64), record["num_kv_heads"]
        if not self._scores.sum() > 0:
            raise ValueError(f"head_scores {str(path)!r}: every score is 0 (no probe was answered): compute them "
                             f"again with more probes, or with --score retrieval for a small model")
        self._budgets: dict[int, torch.Tensor] = {}

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        """Raise if the scores file was made for a model of another shape."""
        layers = self._scores.shape[0]
        if (layers, self._kv_heads) != (num_layers, kv_heads):
            source = self.head_scores or str(DEFAULT_HEAD_SCORES)
            raise ValueError(f"head_scores {source!r} is for a model of {layers} layers and {self._kv_heads} KV heads; "
                             f"this one has {num_layers} and {kv_heads}: make its file with compute_head_scores.py")

    def budgets(self, per_head: int) -> torch.Tensor:
        """(layers, kv_heads) tokens kept beyond the window, for a layer budget of `per_head` + window."""
        if per_head not in self._budgets:
            self._budgets[per_head] = head_budgets(self._scores, self._kv_heads, per_head, self.head_beta)
        return self._budgets[per_head]

    def select_heads(self, inputs: SelectionInputs, layer_idx: int, exact_tokens: int):
        n = inputs.keys.shape[2]
        window = min(self.window_size, n)
        if inputs.keys.shape[1] != self._kv_heads:
            raise ValueError(f"head_scores are for {self._kv_heads} KV heads; this layer has {inputs.keys.shape[1]}")
        budgets = self.budgets(exact_tokens - window)[layer_idx].to(inputs.keys.device)
        scores = self.selection_scores(inputs, layer_idx)
        place = scores.sort(dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
        return head_rows(place < budgets[None, :, None], window)
