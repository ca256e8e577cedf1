#!/usr/bin/env bash
# Everything docs/benchmarks.md asks of a machine with a GPU, in one go:
#   bash tools/gpu_checks.sh OUT_DIR          (PYTHON=... to choose the interpreter; default python3)
# 1. build structtoken_d2._C in place, CUDA kernels for the visible GPU     -> OUT_DIR/build.log
# 2. the CUDA op tests (tests/test_ops_*.py -k "cuda and not emulated")     -> OUT_DIR/cuda_tests.log
# 3. the same under compute-sanitizer --tool memcheck                      -> OUT_DIR/memcheck.log
# 4. tools/benchmark_ops.py --device cuda --dtype bfloat16                 -> OUT_DIR/bench.{json,md,log}
# 5. batched vs sequential multi-scale + flip evaluation, ADE20K ViT-T 512
#    (tools/benchmark_model.py, TEST.SLIDE_BATCH 1, 4, 8, 16; target 1.5x)   -> OUT_DIR/batched_eval.{json,log}
# Wheels in .whl/ (../shared/device/fetch-wheels.sh: detectron2 and friends) are installed first, offline, into
# a temporary site folder. A failed step does not stop the next; the exit status is 1 if any failed.
set -uo pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: torch sees no GPU; run this on a GPU machine')" || exit 1
"$py" -c "import torch; print('gpu_checks:', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$out/device.txt"
date -u +"gpu_checks: %Y-%m-%d %H:%M UTC" | tee -a "$out/device.txt"

status=0
step() {  # step NAME COMMAND...: runs it, logs to OUT_DIR/NAME.log, reports
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); end of $out/$name.log:"
    tail -n 25 "$out/$name.log"
    status=1
  fi
}
tests=(tests/test_ops_slice_attention.py tests/test_ops_depthwise_projection.py)
step build env FORCE_CUDA=1 "$py" setup.py build_ext --inplace
step cuda_tests "$py" -m pytest "${tests[@]}" -q -rs -k "cuda and not emulated"
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$py" -m pytest "${tests[@]}" -q \
  -k "cuda and not emulated and not opcheck"
step bench "$py" tools/benchmark_ops.py --device cuda --dtype bfloat16 --json "$out/bench.json" \
  --markdown "$out/bench.md"
step batched_eval timeout 300 "$py" tools/benchmark_model.py --config-file configs/ade20k/structtoken_cse_vit_t_512.yaml \
  --mode infer --inference multi-scale+flip --image-sizes 512x683 683x512 512x512 --vary TEST.SLIDE_BATCH "1 4 8 16" \
  --ops kernels --iters 5 --warmup 1 --no-memory --json "$out/batched_eval.json" --overwrite
exit $status
