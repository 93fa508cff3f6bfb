#!/usr/bin/env bash
# Build q4conv on the GPU machine and run the CUDA tests, the sanitizer and
# (optionally) the benchmark; logs go to $OUT. `tests` runs the Python suite
# and the CUDA harnesses of tests/cuda. Expects the nvidia-cutlass wheel
# in .whl/ (no network there). Usage: scripts/gpu_check.sh [tests|fused|sanitize|bench|codes|epilogue|sweep|model_train|
# model_targets|model_infer|ddp|demo]...
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export Q4CONV_CUDA_ARCHS=${Q4CONV_CUDA_ARCHS:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
# The distribution's compiler, whose libstdc++ torch uses: the GPU machine's
# /opt/gcc g++ links another libstdc++ copy and C++ exceptions then crash.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl || exit 1
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
# The CUDA harnesses of tests/cuda (compiled for sm_90 / sm_90a, so they run on
# H100 and H200), built with CMake against the CUTLASS wheel installed above
# and run by ctest.
run_harnesses() {
  local generator=()
  if command -v ninja > /dev/null; then generator=(-G Ninja); fi
  { cmake -S tests/cuda -B build/cuda "${generator[@]}" -DQ4CONV_GPU_TESTS=ON \
      -DPython_EXECUTABLE="$(command -v python3)" && cmake --build build/cuda; } \
    > "$OUT/harness_build.log" 2>&1 || { tail -30 "$OUT/harness_build.log"; return 1; }
  ctest --test-dir build/cuda --output-on-failure 2>&1 | tee "$OUT/harness.log" | tail -8
}
for step in "$@"; do
  case "$step" in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/python -x 2>&1 | tee "$OUT/pytest.log" | tail -5
      run_harnesses ;;
    fused)  # the sm90 fused-epilogue kernels against conv_fused's exact arithmetic, bit for bit
      python3 -m pytest -q -p no:cacheprovider tests/python/test_fused_kernels.py tests/python/test_pool_codes.py \
        2>&1 | tee "$OUT/pytest_fused.log" | tail -4 ;;
    sanitize)
      compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider \
        tests/python/test_forward.py tests/python/test_grad.py -k "cuda and not bfloat16" 2>&1 \
        | tee "$OUT/memcheck.log" | tail -4
      compute-sanitizer --tool racecheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider \
        tests/python/test_forward.py -k "cuda and float16 and nhwc" 2>&1 | tee "$OUT/racecheck.log" | tail -4 ;;
    bench) python3 bench/bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    codes) python3 bench/bench_codes.py --out "$OUT" 2>&1 | tee "$OUT/bench_codes.log" | tail -40 ;;
    epilogue) python3 bench/bench_fused_epilogue.py 2>&1 | tee "$OUT/bench_fused_epilogue.log" | tail -30 ;;
    sweep) python3 bench/sweep_sm90_configs.py --out "$OUT" 2>&1 | tee "$OUT/sweep_sm90_configs.log" | tail -30 ;;
    model_targets)  # issue 19's three targets in one run: q4conv AMP vs fp16 AMP vs fake-quant AMP
      python3 bench/bench_model.py --mode train --configs q4_amp16,fp16_amp,fq_amp16 --out "$OUT" 2>&1 \
        | tee "$OUT/bench_model_targets.log" | tail -20 ;;
    model_train) python3 bench/bench_model.py --mode train --out "$OUT" 2>&1 | tee "$OUT/bench_model_train.log" | tail -40 ;;
    model_infer) python3 bench/bench_model.py --mode infer --out "$OUT" 2>&1 | tee "$OUT/bench_model_infer.log" | tail -40 ;;
    ddp) python3 bench/bench_ddp.py --out "$OUT/ddp" 2>&1 | tee "$OUT/bench_ddp.log" | tail -45 ;;
    demo) python3 examples/demo.py --device cuda --out "$OUT/demo" 2>&1 | tee "$OUT/demo.log" | tail -15 ;;
  esac
done
