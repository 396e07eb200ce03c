#!/usr/bin/env bash
# Issue 9's table: {rtn, clip, gptq + clip, gptq with min-max scales} x {uniform, optimal} at 3.25 and
# 4.25 bpw on the embedded model, each sweep computing its own damage tables (--no-cache) so its
# sensitivity time is real. Run alone on the machine: the time column is a ratio to one forward pass
# measured in the same run.
set -euo pipefail
MIXBITS=${MIXBITS:-.venv/bin/mixbits}
PY=${PY:-.venv/bin/python}
for q in ${QUANTIZERS:-rtn clip gptq gptq-minmax}; do
  case "$q" in
    gptq-minmax) args=(--quantizer gptq --no-gptq-clip) ;;
    *) args=(--quantizer "$q") ;;
  esac
  "$MIXBITS" sweep --bpw 3.25,4.25 --strategies optimal,uniform --no-uniform "${args[@]}" --no-cache \
    --eval-windows 8 --output-dir "runs/quantizers-$q"
done
files=()
for q in rtn clip gptq gptq-minmax; do
  [ -f "runs/quantizers-$q/sweep.json" ] && files+=("runs/quantizers-$q/sweep.json")
done
"$PY" bench/tables.py quantizers "${files[@]}" | tee runs/quantizers.md
