#!/usr/bin/env bash
# The GPU figures of issue 7 in one device call, most important first.
#
#   make gpu-carry                        # here, once: ml_collections wheel -> .whl/, Fashion-MNIST -> .gpu_data/
#   run(command="bash experiments/gpu_figures.sh", carry=[".whl", ".gpu_data"], timeout_s=600)
#   GPU_FIGURES_DEADLINE=S bash experiments/gpu_figures.sh profile resnet50
#       # a second call, straight after: the stages the first skipped (tables.txt
#       # names them), S = the lease's budget_left_s less ~30 s
#
# A lease is ~15 minutes of device time, start-up included, and one call at most
# 10, while the full grids of bench_losses and bench_train_step would take far
# longer (48 compiled train steps). So this runs the rows the README's GPU
# tables need, each stage under its own timeout so one slow compile cannot eat
# the rest, and writes every table to $OUT as it goes (what finished comes
# back even when the call is cut off). Compiled programs go to a persistent
# cache, so a rerun on a still-warm machine skips compiling. Every stage's
# limit is also cut to what is left of GPU_FIGURES_DEADLINE (seconds from the
# start, default 570, under the device call's 600 s cap), and a stage with
# under 60 s left (too little to compile and time a row) is skipped with the
# command that runs it later.
#
# Stages (default: all, in this order): env, losses, resnet18, e2e, profile, resnet50.
# profile traces ResNet-18 B=512 bf16 steps (device views, one pass) with
# jax.profiler and prints kernel time by part of the step and the top kernels
# (experiments/profile_step.py). e2e pretrains the quickstart model on Fashion-MNIST with the device
# augmentation backend (no TensorFlow) and prints epoch time and kNN accuracy
# (experiments/run_summary.py); it reads the IDX files from .gpu_data/
# (GPU_FIGURES_DATA to read them elsewhere).
# GPU_FIGURES_SMOKE=1 runs the same plumbing at toy sizes on a CPU;
# GPU_FIGURES_LOSSES_LIMIT / _STEP_LIMIT / _E2E_LIMIT / _PROFILE_LIMIT override the stage limits.
set -u
cd "$(dirname "$0")/.."
# A device call returns at most 8 files from $OUT, so everything goes into five:
# tables.txt (each stage's table, as printed), errors.txt (each stage's stderr),
# and the e2e run's log, report and metrics.
OUT=${OUT:-runs/gpu_figures}
mkdir -p "$OUT"
TABLES=$OUT/tables.txt ERRORS=$OUT/errors.txt
: >"$TABLES"; : >"$ERRORS"
# Rows reach tables.txt as they print, even from a stage its limit kills.
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env losses resnet18 e2e profile resnet50)
t_start=$(date +%s)
deadline=${GPU_FIGURES_DEADLINE:-570}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action=ignore \
    --target /tmp/site .whl/*.whl || { echo "gpu_figures: installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
# The device machine's python3 holds JAX (CUDA) and PyTorch; here, the project's .venv.
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/care_jax_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1

if [ -n "${GPU_FIGURES_SMOKE:-}" ]; then
  loss_args=(--batch-sizes 256 --chunk-sizes 16 --rounds 3)
  step_args=(--width 0.125 --steps 1 --repeats 1)
  r18=(resnet18:32:float32:device resnet18:32:bfloat16:views)
  r50=(resnet50:32:bfloat16:device)
  profile_args=(--width 0.125 --steps 1 --rows resnet18:32:bfloat16:device:batched)
  e2e_preset=":smoke"
  t_losses=120 t_step=300 t_e2e=120 t_profile=120
else
  loss_args=(--rounds 20)
  step_args=(--steps 10 --repeats 3)
  # B = 512 in all four (dtype, augment) cells, then the batch-size sweep in bf16.
  r18=(resnet18:512:bfloat16:device resnet18:512:float32:device resnet18:512:bfloat16:views
       resnet18:512:float32:views resnet18:256:bfloat16:device resnet18:1024:bfloat16:device
       resnet18:512:bfloat16:device:batched)
  r50=(resnet50:512:bfloat16:device resnet50:512:float32:device resnet50:256:bfloat16:device
       resnet50:1024:bfloat16:device)
  # The row the README's profile finding is about; its program is in the
  # compilation cache from the resnet18 stage.
  profile_args=(--steps 5 --top 15 --rows resnet18:512:bfloat16:device:batched)
  # The quickstart run as `make demo` trains it; the random-init baseline's
  # second evaluation is left out (the CPU figures in the README have it).
  e2e_preset=""
  t_losses=150 t_step=210 t_e2e=180 t_profile=90
fi
# Per-stage limits in seconds, to fit what is left of a lease.
t_losses=${GPU_FIGURES_LOSSES_LIMIT:-$t_losses}
t_step=${GPU_FIGURES_STEP_LIMIT:-$t_step}
t_e2e=${GPU_FIGURES_E2E_LIMIT:-$t_e2e}
t_profile=${GPU_FIGURES_PROFILE_LIMIT:-$t_profile}

run_stage() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( deadline - (t0 - t_start) ))
  if [ "$left" -lt 60 ]; then
    echo "=== $name: skipped, ${left}s of the ${deadline}s deadline left;" \
         "run it as: bash experiments/gpu_figures.sh $name" | tee -a "$TABLES"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name (limit ${limit}s)"
  echo "=== $name" >>"$ERRORS"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>>"$ERRORS" | tee -a "$TABLES"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$TABLES"
  [ "$rc" = 0 ] || tail -5 "$ERRORS"
}

e2e_run() {  # the quickstart pretraining + report, then its one-line summary
  local data=${GPU_FIGURES_DATA:-.gpu_data} work=/tmp/care_jax_e2e
  if ! compgen -G "$data/train-images-idx3-ubyte*" >/dev/null; then
    [ -n "${GPU_FIGURES_SMOKE:-}" ] && data=/usr/share/datasets/fashion-mnist || {
      echo "e2e: no Fashion-MNIST IDX files in $data/; run 'make gpu-carry' here and carry .gpu_data" >&2
      return 2; }
  fi
  rm -rf "$work"
  # Cut off by the stage's limit (SIGINT to the group), the run stops; this
  # shell, trapping it, still returns the run's files and its throughput so far.
  trap 'echo "e2e: interrupted by the stage limit" >&2' INT
  $PY -m care_jax.main --config="configs/quickstart.py$e2e_preset" --workdir="$work" \
    --config.augment_backend=device --config.data_dir="$data" --config.random_init_baseline=False \
    >"$OUT/e2e_run.log" 2>&1
  local rc=$?
  # The run's report and metrics come back; its checkpoints and feature cache stay there.
  for f in report.json metrics.jsonl; do [ -f "$work/$f" ] && cp "$work/$f" "$OUT/e2e_$f"; done
  [ "$rc" = 0 ] || tail -3 "$OUT/e2e_run.log" >&2
  [ -f "$work/metrics.jsonl" ] && $PY -m experiments.run_summary "$work"
  return "$rc"
}
export -f e2e_run  # run_stage's timeout starts it in a child bash
export PY OUT e2e_preset

for stage in "${stages[@]}"; do
  case $stage in
    env)
      { date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit \
          --format=csv 2>/dev/null || echo "no nvidia-smi";
        $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
                'optax', optax.__version__, jax.devices())"; } 2>&1 | tee -a "$TABLES" ;;
    losses) run_stage losses "$t_losses" $PY -m experiments.bench_losses "${loss_args[@]}" ;;
    resnet18) run_stage resnet18 "$t_step" $PY -m experiments.bench_train_step "${step_args[@]}" --rows "${r18[@]}" ;;
    e2e) run_stage e2e "$t_e2e" bash -c e2e_run ;;
    profile) run_stage profile "$t_profile" $PY -m experiments.profile_step "${profile_args[@]}" ;;
    resnet50) run_stage resnet50 "$t_step" $PY -m experiments.bench_train_step "${step_args[@]}" --rows "${r50[@]}" ;;
    *) echo "gpu_figures: unknown stage '$stage'; use env, losses, resnet18, e2e, profile, resnet50"; exit 2 ;;
  esac
done

echo; echo "##### tables ($TABLES)"
cat "$TABLES"
