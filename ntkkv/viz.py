"""Figures: needle-in-a-haystack heatmaps and per-layer attention maps.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot's global
state, so that library calls neither open windows nor leak figures.
"""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap, LogNorm
from matplotlib.figure import Figure

from .eval.needle import haystack_files

logger = logging.getLogger(__name__)

# the seed's red-yellow-green needle colours
NEEDLE_CMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
METRIC_RANGES = {"score": (0.0, 10.0), "key_facts_score": (0.0, 1.0)}
METRIC_LABELS = {"score": "ROUGE-1 score (0-10)", "key_facts_score": "key facts found (0-1)"}


def score_grid(records, metric="score"):
    """(depths, lengths, grid): grid[i, j] is the mean `metric` at depths[i], lengths[j]; NaN where absent."""
    if metric not in METRIC_RANGES:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRIC_RANGES)}")
    depths = sorted({r["depth_percent"] for r in records})
    lengths = sorted({r["context_length"] for r in records})
    totals = np.zeros((len(depths), len(lengths)))
    counts = np.zeros_like(totals)
    for r in records:
        if r.get(metric) is None:
            continue
        cell = depths.index(r["depth_percent"]), lengths.index(r["context_length"])
        totals[cell] += r[metric]
        counts[cell] += 1
    with np.errstate(invalid="ignore"):
        return depths, lengths, totals / counts


def panel_label(records):
    """'snapkv 128' from the records' method and budget, else their model_version."""
    first = records[0]
    if first.get("method"):
        budget = first.get("max_capacity_prompt")
        return first["method"] if budget is None else f"{first['method']} {budget}"
    return first.get("model_version", "results")


def plot_needle_heatmaps(panels, path, metric="score", title=None):
    """Write one PNG with a depth x context-length heatmap per panel, side by side.

    panels: {label: records} (records as `ntkkv.eval.needle.load_results` returns them);
    each panel's title gives its mean score. Returns the path written.
    """
    panels = {label: records for label, records in panels.items() if records}
    if not panels:
        raise ValueError("no needle results to plot: every panel is empty")
    vmin, vmax = METRIC_RANGES.get(metric, (None, None))
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.5 * columns + 1, 4.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    image = None
    for ax, (label, records) in zip(axes, panels.items()):
        depths, lengths, grid = score_grid(records, metric)
        image = ax.imshow(grid, cmap=NEEDLE_CMAP, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        # grey dashed cell borders, as the seed's figure
        ax.set_xticks(np.arange(len(lengths) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(depths) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="grey", linestyle="--", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("Token Limit")
        ax.set_ylabel("Depth Percent")
        ax.set_title(f"{label}: mean {np.nanmean(grid):.2f}")
        if grid.size <= 150:  # numbers stay legible on small grids only
            _annotate(ax, grid)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(panels)]), label=METRIC_LABELS.get(metric, metric))
    fig.suptitle(title or 'Fact Retrieval Across Context Lengths ("Needle In A HayStack")')
    logger.info("needle heatmap written to %s", path)
    return _save(fig, path, dpi=120)


def _annotate(ax, grid):
    for (row, column), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize=8, color="black")


def layer_attention_maps(model, input_ids, attention_mask=None):
    """Attention weights of every layer for one prompt, heads averaged: a list of (n, n) arrays.

    Needs a model loaded with attn_implementation="eager" (the others never form the weights).
    """
    if model.config._attn_implementation != "eager":
        raise ValueError(
            f"attention maps need attn_implementation='eager', this model uses "
            f"{model.config._attn_implementation!r}; load it with attn_implementation='eager'"
        )
    if input_ids.shape[0] != 1:
        raise ValueError(f"attention maps take one prompt, got a batch of {input_ids.shape[0]}")
    maps = []

    def keep_head_mean(module, args, output):
        # averaging here keeps one (n, n) map per layer instead of every head of every layer
        maps.append(output[1][0].float().mean(dim=0).cpu().numpy())

    hooks = [layer.self_attn.register_forward_hook(keep_head_mean) for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def essay_excerpts(haystack_dir, tokenizer, count=3, tokens_each=300):
    """The first `tokens_each` tokens of the first `count` essays of a haystack folder, as text."""
    files = haystack_files(haystack_dir)[:count]
    if len(files) < count:
        raise ValueError(f"{haystack_dir} holds {len(files)} essays, {count} were asked for")
    excerpts = []
    for file in files:
        tokens = tokenizer.encode(file.read_text(encoding="utf-8").strip(), add_special_tokens=False)
        excerpts.append(tokenizer.decode(tokens[:tokens_each], skip_special_tokens=True))
    return excerpts


def documents_prompt(tokenizer, documents, question):
    """(input_ids of shape (1, n), start token of each document) for 'Document i: ...' blocks
    followed by the question, through the chat template."""
    blocks = [f"Document {i + 1}: {text}" for i, text in enumerate(documents)]
    content = "\n\n".join(blocks) + f"\n\nQuestion: {question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    token_ends = encoded["offset_mapping"][0, :, 1].tolist()
    # the token holding a block's first character (tokenising a prefix alone could merge differently)
    starts = [next(i for i, end in enumerate(token_ends) if end > text.index(block)) for block in blocks]
    return encoded["input_ids"], starts


def _draw_attention(ax, attention, boundaries, log_scale):
    # log scale: attention spans many orders of magnitude; masked (zero) weights stay blank
    positive = attention[attention > 0]
    floor = max(float(positive.min()), 1e-6) if positive.size else 1e-6
    norm = LogNorm(vmin=floor, vmax=1.0) if log_scale else None
    shown = np.ma.masked_less_equal(attention, 0) if log_scale else attention
    image = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest", aspect="auto")
    for position in boundaries:
        ax.axvline(position - 0.5, color="white", linewidth=0.6, linestyle="--")
        ax.axhline(position - 0.5, color="white", linewidth=0.6, linestyle="--")
    return image


def _save(fig, path, dpi):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_attention_map(attention, path, title="", boundaries=(), log_scale=True):
    """One (n, n) attention map as a PNG; `boundaries` are token positions drawn as lines."""
    fig = Figure(figsize=(6, 5.2), layout="constrained")
    ax = fig.subplots()
    image = _draw_attention(ax, attention, boundaries, log_scale)
    ax.set_xlabel("Key position")
    ax.set_ylabel("Query position")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="attention (heads averaged)")
    return _save(fig, path, dpi=110)


def plot_layer_attention_maps(maps, out_dir, boundaries=(), log_scale=True):
    """One PNG per layer, out_dir/layer_00.png ...; returns the paths written."""
    paths = [
        plot_attention_map(attention, Path(out_dir) / f"layer_{index:02d}.png",
                           title=f"Layer {index}: attention, heads averaged",
                           boundaries=boundaries, log_scale=log_scale)
        for index, attention in enumerate(maps)
    ]
    logger.info("%d attention maps written to %s", len(paths), out_dir)
    return paths


def plot_attention_grid(maps, path, boundaries=(), log_scale=True, columns=6):
    """Every layer's map, small, in one PNG: the overview of how attention narrows with depth."""
    rows = math.ceil(len(maps) / columns)
    fig = Figure(figsize=(2.2 * columns, 2.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, (ax, attention) in enumerate(zip(axes, maps)):
        _draw_attention(ax, attention, boundaries, log_scale)
        ax.set_title(f"layer {index}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps):]:
        ax.set_visible(False)
    fig.suptitle("Attention of every layer (heads averaged" + (", log scale)" if log_scale else ")"))
    return _save(fig, path, dpi=100)
