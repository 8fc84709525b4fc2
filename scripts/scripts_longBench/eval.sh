#!/usr/bin/env bash
# LongBench predictions for one method and budget, one process per GPU (data parallel).
# usage: eval.sh GPUS METHOD BUDGET ATTN_IMPLEMENTATION SOURCE_PATH MODEL_PATH [run_longbench.py flags...]
#   eval.sh 0,1,2,3 SnapKV 128 sdpa ./ meta-llama/Meta-Llama-3-8B-Instruct --datasets qasper,hotpotqa
# Results go to SOURCE_PATH/results_longbench. NPROC=1 runs a single process that spreads a
# large model over all the GPUs listed (device_map=auto) instead of one copy per GPU.
set -euo pipefail
if [ $# -lt 6 ]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
gpus=$1 method=$2 max_capacity_prompts=$3 attn_implementation=$4 source_path=$5 model_path=$6
shift 6
repo_root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=$gpus
nproc=${NPROC:-$(awk -F, '{print NF}' <<< "$gpus")}

arguments=(
    --method "$method"
    --model_path "$model_path"
    --max_capacity_prompts "$max_capacity_prompts"
    --attn_implementation "$attn_implementation"
    --save_dir "${source_path%/}/results_longbench"
    --use_cache True
    "$@"
)
if [ "$nproc" -gt 1 ]; then
    "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
        "$repo_root/run_longbench.py" "${arguments[@]}"
else
    "$python" "$repo_root/run_longbench.py" "${arguments[@]}"
fi
