#!/usr/bin/env bash
# One full GPU session on a lent machine: installs the carried
# nvshmem4py wheel, runs `epcomm info`, warms the JIT cache in parallel, runs the GPU test
# suite and the benchmarks, and leaves logs and JSON under $OUT (default ./gpu-out).
# Usage: bash benchmarks/gpu_session.sh [tests|tests-normal|tests-ll|bench|all] [pytest -k expression]
# Set EPCOMM_GIT_COMMIT when the machine's copy of the repository has a stale git HEAD (seen on
# the lent machines): the benchmark JSON records it.
set -uo pipefail
what=${1:-all}
kexpr=${2:-}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export EPCOMM_CACHE_DIR=${EPCOMM_CACHE_DIR:-/tmp/epcomm-cache}
export EPCOMM_TEST_LOG_DIR=${EPCOMM_TEST_LOG_DIR:-$OUT/spawn-logs}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export EPCOMM_GIT_COMMIT=${EPCOMM_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
ngpu=$(nvidia-smi -L | wc -l)
# One GPU: the multi-rank tests of both modes run 2 ranks sharing it (correctness, not speed).
if (( ngpu == 1 )); then export EPCOMM_SHARE_GPU=${EPCOMM_SHARE_GPU:-1}; fi
{ nvidia-smi; nvidia-smi topo -m; } > "$OUT/machine.txt" 2>&1
python3 -m epcomm.cli info 2>&1 | tee "$OUT/info.txt"
t0=$(date +%s)
python3 -m epcomm.cli warmup --preset tests --smoke -j 16 > "$OUT/warmup.txt" 2>&1
echo "warmup: $(( $(date +%s) - t0 ))s, $(tail -1 "$OUT/warmup.txt")"
# One GPU with ranks sharing it: the normal-mode files take ~2.5 min and the low-latency file
# ~6.5 min, so on a 10-minute call run them as `tests-normal` and `tests-ll`.  The step limits
# exceed the spawns' own (EPCOMM_TEST_TIMEOUT, 480 s), so a hang is reported by the spawn with
# each rank's phase rather than killed silently.
run_tests() {  # name, timeout, files...
  local name=$1 to=$2; shift 2
  timeout "$to" python3 -m pytest -q -rs -p no:cacheprovider ${kexpr:+-k "$kexpr"} \
      --junitxml="$OUT/junit-$name.xml" ${TEST_FILES:-"$@"} 2>&1 | tee "$OUT/tests-$name.txt" | tail -60
}
normal_files="tests/test_smoke_gpu.py tests/test_layout_gpu.py tests/test_interop.py tests/test_timing_gpu.py tests/test_intranode_gpu.py"
if [[ $what == tests || $what == all || $what == tests-normal ]]; then
  run_tests normal "${TEST_TIMEOUT:-540}" $normal_files
fi
if [[ $what == tests || $what == all || $what == tests-ll ]]; then
  run_tests ll "${TEST_TIMEOUT:-540}" tests/test_low_latency_gpu.py
fi
if [[ $what == bench || $what == all ]]; then
  if (( ngpu >= 2 )); then which=all; kind="nvidia-h200-x$ngpu"; else which=low-latency; kind=nvidia-h200; fi
  EPCOMM_BENCH_KIND="$kind" timeout 560 python3 -m epcomm.cli bench $which --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
  # Per-phase timeline of the low-latency kernels (docs/design.md)
  EPCOMM_PROFILE=1 timeout 200 python3 benchmarks/profile_low_latency.py --json "$OUT/profile_low_latency.json" 2>&1 | tail -30
fi
