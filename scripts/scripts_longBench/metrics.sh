#!/usr/bin/env bash
# LongBench scores of a results folder: metrics.json per dataset, results.csv, and the table.
# usage: metrics.sh RESULTS_DIR [eval.py flags, e.g. --longbench_e]
#   metrics.sh ./results_longbench
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,4p' "$0" >&2
    exit 2
fi
results_dir=$1
shift
repo_root=$(cd "$(dirname "$0")/../.." && pwd)
"${PYTHON:-python3}" "$repo_root/eval.py" --results_dir "$results_dir" "$@"
