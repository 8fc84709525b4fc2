#!/usr/bin/env bash
# Needle in a haystack for several methods and budgets, then one heatmap of them all.
# Every setting can be overridden from the environment, e.g.
#   MODEL=/path/to/Meta-Llama-3-8B-Instruct PROVIDER=LLaMA3 DEVICE=cuda S_LEN=1000 E_LEN=8001 STEP=100 \
#       bash scripts/scripts_needle/eval.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-smollm2}                 # 'smollm2', a Hugging Face folder, or a .gguf file
PROVIDER=${PROVIDER:-chat}              # LLaMA3, Mistral2, or chat (any model with a chat template)
METHODS=${METHODS:-"fullkv streamingllm h2o snapkv pyramidkv"}
BUDGETS=${BUDGETS:-"128 512"}           # --max_capacity_prompt values
S_LEN=${S_LEN:-1000}
E_LEN=${E_LEN:-7600}
STEP=${STEP:-1650}
DEPTHS=${DEPTHS:-"0 25 50 75 100"}
ATTN=${ATTN:-sdpa}                      # sdpa, eager, flash_attention_2
DEVICE=${DEVICE:-cpu}                   # cpu, cuda, auto
BATCH=${BATCH:-1}
SAVE_DIR=${SAVE_DIR:-results_needle}
TAG=${TAG:-$(basename "${MODEL%.gguf}")}

mkdir -p "$SAVE_DIR/logs" "$SAVE_DIR/img"
for method in $METHODS; do
  for budget in $BUDGETS; do
    # full KV does not depend on the budget: run it once
    if [ "$method" = fullkv ] && [ "$budget" != "${BUDGETS%% *}" ]; then continue; fi
    version="${TAG}_${method}"
    [ "$method" = fullkv ] || version="${version}_${budget}"
    # shellcheck disable=SC2086
    "$PYTHON" -u run_needle_in_haystack.py --s_len "$S_LEN" --e_len "$E_LEN" --step "$STEP" \
      --model_provider "$PROVIDER" --model_name "$MODEL" --attn_implementation "$ATTN" \
      --method "$method" --max_capacity_prompt "$budget" --model_version "$version" \
      --depths $DEPTHS --save_dir "$SAVE_DIR" --eval_batch_size "$BATCH" --device "$DEVICE" \
      2>&1 | tee "$SAVE_DIR/logs/${version}.log"
  done
done

for metric in score key_facts_score; do
  "$PYTHON" scripts/scripts_needle/visualize.py --results_dir "$SAVE_DIR" --metric "$metric" \
    --out "$SAVE_DIR/img/${TAG}_${metric}.png"
done
