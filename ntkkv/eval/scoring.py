"""Scoring a folder of LongBench predictions: metrics.json per dataset, results.csv for the folder.

Prediction files sit at .../{dataset}/{method}.json (LongBench-E: .../{dataset}_e/...),
possibly with data-parallel part files beside them, which are counted in.
"""
import csv
import json
import logging
import os

import numpy as np

from ntkkv.eval import metrics
from ntkkv.eval.jsonl import read_predictions
from ntkkv.eval.longbench import ALL_DATASETS

logger = logging.getLogger(__name__)

PART_SUFFIX = ".jsonl"


def dataset_of_folder(folder_name, longbench_e):
    """The dataset a results folder holds, or None when it is not one of this mode's."""
    if longbench_e:
        return folder_name[:-2] if folder_name.endswith("_e") and folder_name[:-2] in ALL_DATASETS else None
    return folder_name if folder_name in ALL_DATASETS else None


def methods_in(folder):
    """Method names with a prediction file (or only part files) in a dataset folder."""
    methods = set()
    for name in os.listdir(folder):
        if name.endswith(".json") and name != "metrics.json":
            methods.add(name[: -len(".json")])
        elif name.endswith(PART_SUFFIX) and ".part" in name:
            methods.add(name[: name.rindex(".part")])
    return sorted(methods)


def find_prediction_folders(results_dir, longbench_e=False):
    """[(group, dataset, folder)] for every dataset folder under `results_dir`.

    `group` is the folder between results_dir and the dataset folder (e.g.
    'llama-3-8b-instruct_128'), '' when results_dir is itself such a folder.
    """
    found = []
    for folder, subfolders, _ in os.walk(results_dir):
        subfolders.sort()
        dataset = dataset_of_folder(os.path.basename(folder), longbench_e)
        if dataset is None:
            continue
        group = os.path.relpath(os.path.dirname(folder), results_dir)
        found.append(("" if group == "." else group, dataset, folder))
    return found


def score_predictions(dataset, records, longbench_e=False, matcher="levenshtein"):
    if longbench_e:
        return metrics.bucket_scores(dataset, records, matcher)
    return metrics.dataset_score(dataset, records, matcher)


def score_results(results_dir, longbench_e=False, matcher="levenshtein", on_bad_line="stop"):
    """Score every prediction file; write metrics.json into each dataset folder.

    Returns {row label: {dataset: score}}, the row label being 'group/method' or 'method'.
    """
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results folder {results_dir!r} does not exist")
    table = {}
    for group, dataset, folder in find_prediction_folders(results_dir, longbench_e):
        folder_metrics = {}
        for method in methods_in(folder):
            records = read_predictions(os.path.join(folder, f"{method}.json"), on_bad_line)
            score = score_predictions(dataset, records, longbench_e, matcher)
            folder_metrics[method] = {"score": score, "samples": len(records)}
            row = f"{group}/{method}" if group else method
            table.setdefault(row, {})[dataset] = score
        with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(folder_metrics, handle, ensure_ascii=False, indent=2)
    return table


def paired_difference(dataset, base_records, records, matcher="levenshtein", resamples=2000, seed=0):
    """How much `records` beat `base_records` on the samples both hold (matched by `_id`): the mean
    per-sample score difference ×100 and its 95% percentile-bootstrap interval (resampling the
    pairs). {"samples", "delta", "low", "high"}, or None when no sample is in both."""
    base = {record["_id"]: record for record in base_records}
    differences = [
        metrics.sample_score(dataset, record["pred"], record["answers"], record.get("all_classes"), matcher)
        - metrics.sample_score(dataset, base[record["_id"]]["pred"], base[record["_id"]]["answers"],
                               base[record["_id"]].get("all_classes"), matcher)
        for record in records if record["_id"] in base
    ]
    if not differences:
        return None
    differences = 100 * np.asarray(differences)
    picks = np.random.default_rng(seed).integers(0, len(differences), size=(resamples, len(differences)))
    low, high = np.percentile(differences[picks].mean(axis=1), [2.5, 97.5])
    return {"samples": len(differences), "delta": round(float(differences.mean()), 2),
            "low": round(float(low), 2), "high": round(float(high), 2)}


def compare_to_baseline(results_dir, baseline, matcher="levenshtein", on_bad_line="stop"):
    """Rows [row label, dataset, samples, delta, low, high]: every method against `baseline` in the
    same model/budget folder and dataset, sample by sample (`paired_difference`)."""
    rows, seen = [], set()
    for group, dataset, folder in find_prediction_folders(results_dir):
        methods = methods_in(folder)
        seen.update(methods)
        if baseline not in methods:
            continue
        base_records = read_predictions(os.path.join(folder, f"{baseline}.json"), on_bad_line)
        for method in methods:
            if method == baseline:
                continue
            records = read_predictions(os.path.join(folder, f"{method}.json"), on_bad_line)
            paired = paired_difference(dataset, base_records, records, matcher)
            if paired is not None:
                label = f"{group}/{method}" if group else method
                rows.append([label, dataset, paired["samples"], paired["delta"], paired["low"], paired["high"]])
    if baseline not in seen:
        raise ValueError(f"baseline {baseline!r} has no prediction file; the methods found are: "
                         f"{', '.join(sorted(seen)) or 'none'}")
    return rows


def _mean(scores):
    present = [score for score in scores if score is not None]
    return round(sum(present) / len(present), 2) if present else None


def table_rows(table, longbench_e=False):
    """Header and rows of the methods × datasets table, with the average over each row's datasets."""
    datasets = [name for name in ALL_DATASETS if any(name in scores for scores in table.values())]
    if longbench_e:
        buckets = [name for name, _ in metrics.LENGTH_BUCKETS]
        header = ["method"] + [f"{dataset} {bucket}" for dataset in datasets for bucket in buckets]
        header += [f"average {bucket}" for bucket in buckets]
    else:
        header = ["method"] + datasets + ["average"]
    rows = []
    for label in sorted(table, key=str.lower):
        scores = table[label]
        if longbench_e:
            cells = [(scores.get(dataset) or {}).get(bucket) for dataset in datasets for bucket in buckets]
            averages = [_mean((scores.get(dataset) or {}).get(bucket) for dataset in datasets) for bucket in buckets]
        else:
            cells = [scores.get(dataset) for dataset in datasets]
            averages = [_mean(cells)]
        rows.append([label] + cells + averages)
    return header, rows


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if cell is None else cell for cell in row] for row in rows])


def format_table(header, rows):
    """A plain-text table, columns aligned, scores with two decimals, missing ones shown as '-'."""
    lines = [header] + [[row[0]] + ["-" if cell is None else f"{cell:.2f}" if isinstance(cell, float) else str(cell)
                                    for cell in row[1:]] for row in rows]
    widths = [max(len(str(line[column])) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
                  for column, (cell, width) in enumerate(zip(line, widths)))
        for line in lines
    )
