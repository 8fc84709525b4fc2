#!/usr/bin/env bash
# A budget sweep of eval.sh: the same positional arguments, BUDGETS a comma list.
# usage: eval_methods.sh GPUS METHOD BUDGETS ATTN_IMPLEMENTATION SOURCE_PATH MODEL_PATH [run_longbench.py flags...]
#   eval_methods.sh 0,1 PyramidKV 64,128,256,512,1024,2048 sdpa ./ smollm2
set -euo pipefail
if [ $# -lt 6 ]; then
    sed -n '2,4p' "$0" >&2
    exit 2
fi
gpus=$1 method=$2 budgets=$3
shift 3
for max_capacity_prompts in ${budgets//,/ }; do
    bash "$(dirname "$0")/eval.sh" "$gpus" "$method" "$max_capacity_prompts" "$@"
done
