#!/usr/bin/env bash
# Run every GPU check of structtoken-d2 in one call, each step time-boxed, within 9 minutes on one H200.
#
#   bash tools/gpu_checks.sh gpu_out             # on a machine with a GPU (PYTHON=... picks the interpreter)
#   bash tools/gpu_checks.sh --dry-run dry_out   # the same steps on the CPU: tiny shapes, under a minute
#
# The steps (table below): build the CUDA kernels for the visible GPU, the CUDA op tests, compute-sanitizer
# memcheck / racecheck / synccheck, the head's training step under bf16 autocast against the PyTorch ops,
# 50 AMP iterations of the main job, a torchrun (NCCL) launch, the op and whole-model benchmarks and the
# batched evaluation. Each runs under its own timeout (and what is left of the budget, GPU_CHECKS_BUDGET_S,
# default 540 s); a failed step does not stop the next. After each step OUT/summary.md and OUT/summary.json
# (tools/gpu_checks_summary.py) are rewritten whole: a row per step (passed, failed, timed out, skipped, not
# run), its seconds against the plan and its key figures; logs are OUT/<step>.log. Wheels in .whl/
# (../shared/device/fetch-wheels.sh: detectron2 and friends) are installed first, offline, into a temporary
# site folder. --dry-run runs every step on the CPU with tiny shapes and a few iterations, and reports what
# needs a GPU as skipped with the reason, after checking what it can of it (its pytest selection, its
# commands). Exit status 1 if a step failed, timed out or was not run. docs/benchmarks.md, "GPU checks",
# has the tables the figures go to.
set -uo pipefail

# name                planned s  timeout s  what it does
STEPS='
wheels                    5    60  install .whl/ (detectron2 and friends) offline into a temporary site folder
device                   10    60  the GPU, its compute capability and roofline peaks, torch and CUDA versions
build                   100   240  structtoken_d2._C in place, nvcc for the GPU architecture alone (sm_90 on H200)
cuda_tests               35   120  CUDA op tests against float64: fp32/fp16/bf16, odd shapes, zero-size, strided
memcheck                 40    90  compute-sanitizer memcheck on a small kernel test of each op
racecheck                30    90  compute-sanitizer racecheck on the same tests
synccheck                25    90  compute-sanitizer synccheck on the same tests
head_bf16                25    90  head training step per variant under bf16 autocast: kernels vs PyTorch ops
train_amp                50   150  50 iterations of the main job under AMP bf16: kernels vs PyTorch ops
launch_nccl              30    90  the main job through torchrun on the NCCL backend, then its evaluation
bench_ops                45   150  op benchmark at the paper shapes against eager PyTorch, roofline columns
batched_eval             40   120  batched vs sequential multi-scale + flip evaluation, ADE20K ViT-T 512
bench_model              30    90  whole model, ADE20K ViT-T 512: training step and images/s, kernels vs PyTorch
bench_model_compile      75   150  whole model: training step eager vs MODEL.COMPILE (kernels)
'
OP_TESTS=(tests/test_ops_slice_attention.py tests/test_ops_depthwise_projection.py)
# A small kernel test of each op (both thread layouts of the projection) for compute-sanitizer.
SANITIZER_TESTS=(
  "tests/test_ops_slice_attention.py::test_cuda_error_within_factor_of_eager[2x5x3x7-float32]"
  "tests/test_ops_slice_attention.py::test_cuda_error_within_factor_of_eager[1x7x37x65-bfloat16]"
  "tests/test_ops_depthwise_projection.py::test_cuda_error_within_factor_of_eager[2x7x9x300x1-bfloat16]"
  "tests/test_ops_depthwise_projection.py::test_cuda_error_within_factor_of_eager[1x3x5x4096x4-float32]"
)
ADE20K=configs/ade20k/structtoken_cse_vit_t_512.yaml
ADE20K_IMAGES=(512x683 683x512 512x512)
MAIN_JOB=configs/synthetic/structtoken_shapes.yaml
# Dry run: the main job's config shrunk to a 32-wide, one-block model on 32x32 inputs.
TINY_MODEL=(MODEL.VIT.EMBED_DIM 32 MODEL.VIT.DEPTH 1 MODEL.VIT.NUM_HEADS 2 MODEL.VIT.IMG_SIZE "[32, 32]"
  MODEL.STRUCTTOKEN.NUM_BLOCKS 1 MODEL.STRUCTTOKEN.TOKEN_SIZE "[2, 2]" INPUT.CROP.SIZE "[32, 32]" SOLVER.IMS_PER_BATCH 2
  TEST.SLIDE_CROP_SIZE "[32, 32]" TEST.SLIDE_STRIDE "[21, 21]" TEST.SCALE "[32, 32]")

# ------------------------------------------------------------------------------------------- steps
# Each step_NAME runs with its output in OUT/NAME.log; it may set `figures` (options of
# tools/gpu_checks_summary.py record) and `skip_reason` (then a success is "skipped", with that reason).
step_wheels() {
  if (( dry )); then skip_reason="dry run: the packages of $py"; return 0; fi
  if ! compgen -G ".whl/*.whl" > /dev/null; then skip_reason="no .whl/: the packages of $py"; return 0; fi
  local site
  site=$(mktemp -d)
  bounded "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || return
  export PYTHONPATH="$root:$site${PYTHONPATH#"$root"}"
  figures=(--figure "wheels=$(compgen -G ".whl/*.whl" | wc -l)")
}

step_device() {
  (( dry )) || nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  figures=(--figures "json:$out/device.json")
  bounded "$py" tools/gpu_check_device.py --json "$out/device.json"
}

step_build() {
  if (( dry )); then skip_reason="needs nvcc and a GPU: it builds for the GPU's own architecture (sm_90 on an H200)"
    return 0; fi
  local arch
  arch=$("$py" tools/gpu_checks_summary.py field "$out/device.json" torch_cuda_arch_list) \
    || { echo "gpu_checks: no compute capability in $out/device.json: did the device step see the GPU?"; return 1; }
  bounded env TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="$(nproc)" "$py" setup.py build_ext --inplace || return
  bounded "$py" tools/gpu_check_device.py --json "$out/build.json" --require-compiled-ops || return
  figures=(--figure "TORCH_CUDA_ARCH_LIST=$arch" --figure "ops=$("$py" tools/gpu_checks_summary.py field \
    "$out/build.json" ops)" --figure "SASS=$(cuobjdump --list-elf structtoken_d2/_C*.so 2>/dev/null \
    | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')")
}

step_cuda_tests() {
  figures=(--figures "junit:$out/cuda_tests.xml" --expect-tests "$( (( dry )) && echo skipped || echo run)")
  (( dry )) && skip_reason="needs a GPU and the CUDA build: the selection ran here, every test skipped"
  bounded "$py" -m pytest "${OP_TESTS[@]}" -q -rs -p no:cacheprovider -k "cuda and not emulated" \
    --junitxml "$out/cuda_tests.xml"
}

sanitize() {  # sanitize TOOL: compute-sanitizer --tool TOOL on SANITIZER_TESTS
  local tool=$1
  if (( dry )); then
    skip_reason="needs a GPU and compute-sanitizer: its ${#SANITIZER_TESTS[@]} tests are among the CUDA tests collected"
    "$py" tools/gpu_checks_summary.py selection "$out/cuda_tests.xml" "${SANITIZER_TESTS[@]}"
    return
  fi
  figures=(--figures "sanitizer:$out/$tool.log" --figures "junit:$out/$tool.xml" --expect-tests run)
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  # Without the caching allocator every tensor is its own allocation, so an access past one is caught.
  bounded env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    "$py" -m pytest "${SANITIZER_TESTS[@]}" -q -p no:cacheprovider --junitxml "$out/$tool.xml"
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }
step_synccheck() { sanitize synccheck; }

step_head_bf16() {
  figures=(--figures "json:$out/head_bf16.json")
  if (( dry )); then bounded "$py" tools/gpu_check_head.py --json "$out/head_bf16.json" --tiny --iters 1 --warmup 0
  else bounded "$py" tools/gpu_check_head.py --json "$out/head_bf16.json" --require-kernels; fi
}

step_train_amp() {
  local args=(--runs kernels pytorch-ops --output "$out/train_amp" --json "$out/train_amp.json")
  figures=(--figures "json:$out/train_amp.json")
  if (( dry )); then bounded "$py" tools/gpu_check_train.py "${args[@]}" --tiny --iters 3
  else bounded "$py" tools/gpu_check_train.py "${args[@]}" --iters 50 --require-decrease --require-kernels \
    DATALOADER.NUM_WORKERS 4; fi
}

step_launch_nccl() {
  local args=(--runs torchrun --iters 20 --output "$out/launch_nccl" --json "$out/launch_nccl.json"
    --require-backend nccl --require-kernels TEST.EVAL_AFTER_TRAIN True TEST.AUG.ENABLED False)
  if (( dry )); then
    skip_reason="needs a GPU: NCCL; its command was built (see the log)"
    bounded "$py" tools/gpu_check_train.py --print-commands "${args[@]}"
    return
  fi
  figures=(--figures "json:$out/launch_nccl.json")
  bounded "$py" tools/gpu_check_train.py "${args[@]}"
}

step_bench_ops() {
  local args=(--no-compile --json "$out/bench_ops.json" --markdown "$out/bench_ops.md")
  figures=(--figures "ops-benchmark:$out/bench_ops.json")
  if (( dry )); then bounded "$py" tools/benchmark_ops.py "${args[@]}" --device cpu --smoke --iters 1 --warmup 0
  else bounded "$py" tools/benchmark_ops.py "${args[@]}" --device cuda --dtype bfloat16; fi
}

model_benchmark() {  # model_benchmark NAME ARGS...: tools/benchmark_model.py, the dry run's on the tiny model
  local name=$1
  shift
  figures=(--figures "model-benchmark:$out/$name.json")
  if (( dry )); then bounded "$py" tools/benchmark_model.py --config-file "$MAIN_JOB" "$@" --image-sizes 32x40 \
    --iters 1 --warmup 0 --no-memory --json "$out/$name.json" "${TINY_MODEL[@]}"
  else bounded "$py" tools/benchmark_model.py --config-file "$ADE20K" "$@" --image-sizes "${ADE20K_IMAGES[@]}" \
    --iters 5 --json "$out/$name.json"; fi
}
step_batched_eval() {
  model_benchmark batched_eval --mode infer --inference multi-scale+flip --vary TEST.SLIDE_BATCH "1 4 8 16" \
    --ops kernels --warmup 1 --no-memory
}
step_bench_model() { model_benchmark bench_model --mode both --ops kernels pytorch --warmup 2; }
step_bench_model_compile() {
  if (( dry )); then
    skip_reason="dry run: compiling takes minutes on a CPU; ran with TORCH_COMPILE_DISABLE=1 to check the command"
    export TORCH_COMPILE_DISABLE=1
  fi
  model_benchmark bench_model_compile --mode train --ops kernels --compile --warmup 2
  local rc=$?
  unset TORCH_COMPILE_DISABLE
  return $rc
}

# ---------------------------------------------------------------------------------------- machinery
bounded() {  # bounded COMMAND...: runs it, killed (status 124) when the step's time is up
  local left=$((step_end - SECONDS))
  (( left > 0 )) || return 124
  timeout -k 10 "$left" "$@"
}

run_step() {  # run_step NAME: step_NAME within its timeout and the budget left; its row recorded
  local name=$1 start=$SECONDS left=$((deadline - SECONDS)) rc status reason
  local cap=${TIMEOUT[$name]}
  (( left > cap )) && left=$cap
  echo "== $name (planned ${PLANNED[$name]} s, at most $(( left > 0 ? left : 0 )) s): ${TITLE[$name]}"
  if (( left < 5 )); then
    "$py" tools/gpu_checks_summary.py record "$out" "$name" --status "not run" --seconds 0 \
      --reason "no time left of the $budget s budget"
    return
  fi
  step_end=$((SECONDS + left))
  figures=() skip_reason=""
  "step_$name" > "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed reason=$skip_reason; [[ -n $skip_reason ]] && status=skipped ;;
    124|137) status="timed out" reason="stopped after $left s" ;;
    *) status=failed reason="exit status $rc" ;;
  esac
  "$py" tools/gpu_checks_summary.py record "$out" "$name" --status "$status" --seconds $((SECONDS - start)) \
    --log "$name.log" ${reason:+--reason "$reason"} ${figures[@]+"${figures[@]}"} \
    || echo "   (the summary could not record $name)"
  if [[ $status != passed && $status != skipped ]]; then
    echo "   end of $out/$name.log:"
    tail -n 25 "$out/$name.log" | sed 's/^/   | /'
  fi
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${1:?usage: bash tools/gpu_checks.sh [--dry-run] OUT_DIR   (--help says more)}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
py=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET_S:-540}
if [[ -e $out/summary.json ]]; then
  echo "gpu_checks: $out already holds a run (summary.json); give a new folder" >&2
  exit 1
fi
if (( ! dry )); then
  "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: torch sees no GPU; run \
this on a GPU machine, or try the steps on the CPU with --dry-run')" || exit 1
fi
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(( dry )) && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

declare -A PLANNED TIMEOUT TITLE
ORDER=()
while read -r name planned cap title; do
  [[ -n $name ]] || continue
  ORDER+=("$name") && PLANNED[$name]=$planned TIMEOUT[$name]=$cap TITLE[$name]=$title
done <<< "$STEPS"
mode=gpu && (( dry )) && mode=dry-run
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ $commit != unknown && -n $(git status --porcelain 2>/dev/null) ]] && commit="$commit+changes"
init=()
total=0
echo "gpu_checks: $mode into $out, budget $budget s; the plan (planned s / timeout s):"
for name in "${ORDER[@]}"; do
  init+=(--step "$name" "${PLANNED[$name]}" "${TIMEOUT[$name]}" "${TITLE[$name]}")
  total=$((total + PLANNED[$name]))
  printf '  %-20s %4s / %-4s %s\n' "$name" "${PLANNED[$name]}" "${TIMEOUT[$name]}" "${TITLE[$name]}"
done
printf '  %-20s %4s\n' total "$total"
"$py" tools/gpu_checks_summary.py init "$out" --mode "$mode" --budget "$budget" --commit "$commit" "${init[@]}" \
  || exit 1
deadline=$((SECONDS + budget))
for name in "${ORDER[@]}"; do
  run_step "$name"
done
echo "gpu_checks: done in $SECONDS s; $out/summary.md:"
"$py" tools/gpu_checks_summary.py finish "$out"
