#!/usr/bin/env bash
# A step runner for one device call, sourced by scripts that run several checks in one call
# (benchmarks/gpu_owed.sh).  `step NAME LIMIT CMD...` runs CMD under min(LIMIT, what is left of
# BUDGET less 5 s), logs it to $OUT/NAME.log and appends one line (exit status, time, pytest's or
# the example's last verdict) to $OUT/summary.txt; a step whose name does not match the regular
# expression ONLY (when set) is skipped.  CMD is an executable, not a shell function (`timeout`
# runs it); at its limit it gets SIGTERM, then SIGKILL 10 s later (time for pytest to end its
# spawn's workers and print its failures: tests/conftest.py).  Sets what every GPU run needs:
# the NVLS switches off, ranks sharing one GPU, the carried nvshmem4py wheel (.whl/) installed
# once per machine.
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export EPCOMM_CACHE_DIR=${EPCOMM_CACHE_DIR:-/tmp/epcomm-cache}
export EPCOMM_TEST_LOG_DIR=${EPCOMM_TEST_LOG_DIR:-$OUT/spawn-logs}
export EPCOMM_GIT_COMMIT=${EPCOMM_GIT_COMMIT:-unknown}
if (( $(nvidia-smi -L | wc -l) == 1 )); then export EPCOMM_SHARE_GPU=${EPCOMM_SHARE_GPU:-1}; fi
SECONDS=0
if ls .whl/*.whl >/dev/null 2>&1 && [[ ! -d /tmp/site/nvshmem ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L > "$OUT/machine.txt" 2>&1
step() {
  local name=$1 lim=$2; shift 2
  if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then return; fi
  local left=$(( BUDGET - SECONDS - 5 ))
  if (( left < 20 )); then echo "$name: SKIPPED (${left}s left)" | tee -a "$OUT/summary.txt"; return; fi
  (( lim > left )) && lim=$left
  local t0=$SECONDS
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc limit ${lim}s took $(( SECONDS - t0 ))s :: $(grep -E '(passed|failed|error|PASS|FAIL)' "$OUT/$name.log" | tail -1 | cut -c1-200)" | tee -a "$OUT/summary.txt"
}
