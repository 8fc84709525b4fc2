"""A RULER grid: every method (and summary) at every budget, one table of RULER scores.

    python benchmarks/ruler_grid.py --model_path smollm2 --lengths 4096 --num_samples 50 \
        --tasks niah_single_1 niah_single_2 niah_multikey_1 niah_multivalue niah_multiquery \
        --methods fullkv snapkv pyramidkv adakv headkv snapkv+cam --budgets 128 512 r0.25 r0.5 \
        --jobs 6 --out docs/results/DATE-ruler-smollm2-4k-h200.md

Each (method, budget) is one run_ruler.py process (--jobs of them at a time, on one GPU: the small
models leave it mostly idle), writing to --save_dir as run_ruler.py does (a run resumes); then eval.py
--ruler scores each budget's folder, and the table gives per method and budget the average over the
tasks, and per task the scores. A method is a run_ruler.py method, or METHOD+SUMMARY; a budget is a
number of tokens (max_capacity_prompts) or rR, a share R of each prompt (max_capacity_prompts_ratio).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="smollm2")
    parser.add_argument("--model_name", default=None)
    parser.add_argument("--lengths", nargs="+", default=["4096"])
    parser.add_argument("--num_samples", default="50")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", required=True, help="METHOD or METHOD+SUMMARY")
    parser.add_argument("--budgets", nargs="+", required=True, help="tokens, or rR for a share R of each prompt")
    parser.add_argument("--save_dir", default="results_ruler")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run_ruler.py flags (last)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for budget in args.budgets:
        try:
            float(budget[1:]) if budget.startswith("r") else int(budget)
        except ValueError:
            parser.error(f"bad budget {budget!r}: a number of tokens (128) or r and a share (r0.25)")
    return args


def budget_flags(budget: str) -> list[str]:
    if budget.startswith("r"):
        return ["--max_capacity_prompts", "-1", "--max_capacity_prompts_ratio", budget[1:]]
    return ["--max_capacity_prompts", budget]


def budget_folder(model_name: str, budget: str) -> str:
    return f"{model_name}_ratio{budget[1:]}" if budget.startswith("r") else f"{model_name}_{budget}"


def run(command) -> tuple[list[str], int, str]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return command, done.returncode, (done.stdout + done.stderr)[-2000:]


def main(argv=None):
    args = parse_args(argv)
    model_name = args.model_name or Path(args.model_path).stem.lower()
    commands = []
    for method in args.methods:
        name, _, summary = method.partition("+")
        budgets = ["128"] if name.lower() == "fullkv" else args.budgets  # full KV has no budget: one run
        for budget in budgets:
            command = [sys.executable, "run_ruler.py", "--method", name, "--model_path", args.model_path,
                       "--model_name", model_name, "--lengths", *args.lengths, "--num_samples", args.num_samples,
                       "--tasks", *args.tasks, "--save_dir", args.save_dir, *budget_flags(budget), *args.extra]
            commands.append(command + (["--summary", summary] if summary else []))
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for command, code, tail in pool.map(run, commands):
            label = " ".join(command[2:6] + command[command.index("--max_capacity_prompts"):][:4])
            print(f"{'ok  ' if code == 0 else 'FAIL'} {label}", file=sys.stderr, flush=True)
            if code:
                failed += 1
                print(tail, file=sys.stderr)
    folders = sorted({budget_folder(model_name, budget) for budget in args.budgets + ["128"]})
    table = {}
    for folder in folders:
        path = Path(args.save_dir) / folder
        if not path.is_dir():
            continue
        subprocess.run([sys.executable, "eval.py", "--results_dir", str(path), "--ruler"], cwd=ROOT, check=True,
                       capture_output=True)
        with open(path / "results.csv", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                table[row["method"], folder, row["length"]] = row
    print(markdown(table, args, model_name))
    if args.out:
        args.out.write_text(markdown(table, args, model_name) + "\n")
    sys.exit(1 if failed else 0)


def markdown(table, args, model_name) -> str:
    """The average over the tasks per method (rows) and budget (columns), then every score."""
    budgets = [budget_folder(model_name, budget) for budget in args.budgets]
    methods = sorted({key[0] for key in table}, key=lambda m: (m.lower() != "fullkv", m.lower()))
    lines = []
    for length in args.lengths:
        lines += [f"### {length} tokens: average over the tasks", "",
                  "| method | " + " | ".join(folder.removeprefix(model_name + "_") for folder in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for method in methods:
            cells = []
            for folder in budgets:
                row = table.get((method, folder, length)) or table.get((method, f"{model_name}_128", length)) \
                    if method.lower() == "fullkv" else table.get((method, folder, length))
                cells.append(f"{float(row['average']):.1f}" if row and row.get("average") else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"### {length} tokens: each task", "",
                  "| method | budget | " + " | ".join(args.tasks) + " | average |",
                  "|---|---|" + "---:|" * (len(args.tasks) + 1)]
        for (method, folder, row_length), row in sorted(table.items()):
            if row_length != length:
                continue
            scores = [f"{float(row[task]):.1f}" if row.get(task) else "" for task in args.tasks]
            budget = "" if method.lower() == "fullkv" else folder.removeprefix(model_name + "_")
            lines.append(f"| {method} | {budget} | " + " | ".join(scores) + f" | {float(row['average']):.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
