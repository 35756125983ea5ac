#!/usr/bin/env bash
# One full GPU session on a lent machine: installs the carried
# nvshmem4py wheel, runs `epcomm info`, warms the JIT cache in parallel, runs the GPU test
# suite and the benchmarks, and leaves logs and JSON under $OUT (default ./gpu-out).
# Several checks in one call, each with its own limit: benchmarks/gpu_owed.sh (benchmarks/gpu_steps.sh).
# Usage: bash benchmarks/gpu_session.sh [tests|tests-normal|tests-ll|tests-internode|tests-dropin|tests-compiled|tests-faults|soak|bench|all] [pytest -k expression]
# Pass EPCOMM_GIT_COMMIT=<sha>[+dirty] (computed where the tree was sent from): the lent
# machines' copies have had a stale git HEAD, and the benchmark JSON records this value.
#
# bench: made for one device call (at most 600 s).  Every step's time limit fits what is left of
# SESSION_BUDGET_S (default 570 s from the script's start), and inside the benchmark each mode's
# spawn has its own, shorter limit (`epcomm bench --timeout`), so a hang is reported by the spawn
# with every rank's phase before the outer limit fires, and the JSON of a finished mode is
# written already (`epcomm bench` writes it after each mode).  Order: `epcomm bench` (both modes
# with 2+ GPUs, low-latency alone on one) and the project's bars on its JSON (benchmarks/bars.py),
# then, while time is left, benchmarks/profile_normal.py (2+ GPUs: what limits the normal mode)
# and benchmarks/profile_low_latency.py.
set -uo pipefail
what=${1:-all}
kexpr=${2:-}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SECONDS=0
budget=${SESSION_BUDGET_S:-570}
# Seconds left of the budget in bench and soak modes (the test modes keep their own fixed limits).
left() { if [[ $what == bench || $what == soak ]]; then echo $(( budget - SECONDS )); else echo 100000; fi; }
min() { echo $(( $1 < $2 ? $1 : $2 )); }
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
if [[ -z ${EPCOMM_GIT_COMMIT:-} ]]; then
  EPCOMM_GIT_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  echo "WARNING: EPCOMM_GIT_COMMIT is unset: recording this copy's git HEAD ($EPCOMM_GIT_COMMIT), which has" \
       "been stale on lent machines and says nothing of uncommitted changes; pass" \
       "EPCOMM_GIT_COMMIT=<sha>[+dirty] from where the tree was sent" | tee "$OUT/WARNING-commit.txt" >&2
fi
export EPCOMM_GIT_COMMIT
ngpu=$(nvidia-smi -L | wc -l)
# One GPU: the multi-rank tests of both modes run 2 ranks sharing it (correctness, not speed).
if (( ngpu == 1 )); then export EPCOMM_SHARE_GPU=${EPCOMM_SHARE_GPU:-1}; fi
{ nvidia-smi; nvidia-smi topo -m; } > "$OUT/machine.txt" 2>&1
timeout 60 python3 -m epcomm.tools.cli info 2>&1 | tee "$OUT/info.txt"
t0=$SECONDS
# bench needs only the DeepSeek-V3 shapes (and the wait kernels of --smoke); the tests need all.
preset=tests; [[ $what == bench ]] && preset=deepseek-v3
# The warm-up may take at most what leaves the benchmark 330 s (a cold cache: ~10 s with -j 16).
wto=$(min 120 $(( $(left) - 330 ))); (( wto < 30 )) && wto=30
timeout "$wto" python3 -m epcomm.tools.cli warmup --preset "$preset" --smoke -j 16 > "$OUT/warmup.txt" 2>&1
wrc=$?
echo "warmup: $(( SECONDS - t0 ))s (limit ${wto}s, exit $wrc), $(tail -1 "$OUT/warmup.txt")"
# One GPU with ranks sharing it: the normal-mode files take ~2.5 min and the low-latency file
# ~6.5 min, so on a 10-minute call run them as `tests-normal` and `tests-ll`.  The step limits
# exceed the spawns' own (EPCOMM_TEST_TIMEOUT, 480 s), so a hang is reported by the spawn with
# each rank's phase rather than killed silently.
run_tests() {  # name, timeout, files...
  local name=$1 to=$2; shift 2
  timeout "$to" python3 -m pytest -q -rs -p no:cacheprovider ${kexpr:+-k "$kexpr"} \
      --junitxml="$OUT/junit-$name.xml" ${TEST_FILES:-"$@"} 2>&1 | tee "$OUT/tests-$name.txt" | tail -60
}
normal_files="tests/gpu/test_smoke_gpu.py tests/gpu/test_layout_gpu.py tests/gpu/test_interop_gpu.py tests/gpu/test_timing_gpu.py tests/gpu/test_intranode_gpu.py"
if [[ $what == tests || $what == all || $what == tests-normal ]]; then
  run_tests normal "${TEST_TIMEOUT:-540}" $normal_files
fi
if [[ $what == tests || $what == all || $what == tests-ll ]]; then
  run_tests ll "${TEST_TIMEOUT:-540}" tests/gpu/test_low_latency_gpu.py
fi
# Internode: nodes declared inside the test (EPCOMM_RANKS_PER_NODE); with EPCOMM_TEST_RANKS=4 or
# 8 sharing one GPU it covers 2x2 and 4x1 (2x4, 4x2, 8x1).
if [[ $what == tests || $what == all || $what == tests-internode ]]; then
  run_tests internode "${TEST_TIMEOUT:-540}" tests/gpu/test_internode_gpu.py
fi
# The DeepEP drop-in (tests and its example), the compiled-program paths (epcomm.jax under jit,
# torch.compile) and the failure paths (rank masks and fault injection, the GPU fuzz).
# The drop-in's spawns take ~10 s each (6 in 52 s with 2 ranks): a spawn limit of 200 s under the
# step's 300 s, so a hang is reported by its spawn (with each rank's phase), not killed silently.
if [[ $what == tests || $what == all || $what == tests-dropin ]]; then
  EPCOMM_TEST_TIMEOUT=${EPCOMM_TEST_TIMEOUT:-200} run_tests dropin "${TEST_TIMEOUT:-300}" tests/gpu/test_deep_ep_dropin_gpu.py
  timeout 120 python3 examples/deep_ep_drop_in.py 2>&1 | tee "$OUT/example-deep_ep_drop_in.txt" | tail -3
fi
if [[ $what == tests || $what == all || $what == tests-compiled ]]; then
  run_tests compiled "${TEST_TIMEOUT:-540}" tests/gpu/test_jax_jit_gpu.py tests/gpu/test_torch_compile_gpu.py
fi
# tests-faults: 8 spawns of the fault file (each limited to 240 s inside the test) and the fuzz.
# With 4 or more ranks sharing one GPU, run it as two calls: TEST_FILES=<one file> (or -k groups).
if [[ $what == tests || $what == all || $what == tests-faults ]]; then
  run_tests faults "${TEST_TIMEOUT:-540}" tests/gpu/test_fault_injection_gpu.py tests/gpu/test_fuzz_gpu.py
fi
# The soak (benchmarks/soak.py): SOAK_RANKS ranks (default 2), SOAK_CALLS calls, within what is
# left of SESSION_BUDGET_S (at most SOAK_LIMIT, default 560 s).  soak.py keeps its own margins
# inside --time-limit (its ranks stop 45 s before it, its spawn ends 15 s before it), so its JSON
# is written before this step's outer limit, even after a hang.
if [[ $what == soak ]]; then
  slim=$(min "${SOAK_LIMIT:-560}" $(( $(left) - 15 )))
  echo "soak: time limit ${slim}s ($(left)s left of ${budget}s)"
  timeout -k 10 "$(( slim + 10 ))" python3 benchmarks/soak.py --ranks "${SOAK_RANKS:-2}" --calls "${SOAK_CALLS:-10000}" \
      --seed "${SOAK_SEED:-1}" --time-limit "$slim" --json "$OUT/soak.json" 2>&1 | tee "$OUT/soak.txt" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  if (( ngpu >= 2 )); then which=all; nmodes=2; kind="nvidia-h200-x$ngpu"; else which=low-latency; nmodes=1; kind=nvidia-h200; fi
  # Outer limit: what is left less 20 s (the profiles may then get nothing), at most 460 s.  Each
  # mode's spawn gets an equal share of it less 40 s for the parent (imports, GPU probe), at most
  # 200 s (a mode takes about 1-2 min, most of it process, NCCL and NVSHMEM start-up).
  bto=$(min 460 $(( $(left) - 20 )))
  sto=$(min 200 $(( (bto - 40) / nmodes )))
  echo "bench: outer limit ${bto}s, each mode's spawn ${sto}s ($(left)s left of ${budget}s)"
  EPCOMM_BENCH_KIND="$kind" timeout -k 10 "$bto" python3 -m epcomm.tools.cli bench $which --timeout "$sto" \
      --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
  # The project's performance bars, evaluated on what the benchmark wrote (no GPU work).
  if [[ -f $OUT/bench.json ]]; then
    python3 benchmarks/bars.py "$OUT/bench.json" --json "$OUT/bars.json" 2>&1 | tee "$OUT/bars.txt"
  fi
  # What limits the normal mode (per-block timeline, docs/design.md), at the benchmark's default
  # launch config (config.py: send share 0.33 on 2 ranks, 0.5 on more; 128-row dispatch chunks)
  # with 24 and 12 SMs, for the operations the bars are about.
  if (( ngpu >= 2 )); then
    pl=$(( $(left) - 10 ))
    if (( pl >= 60 )); then
      frac=0.33; (( ngpu > 2 )) && frac=0.5
      EPCOMM_PROFILE=1 timeout -k 5 "$(min 150 "$pl")" python3 benchmarks/profile_normal.py \
          --configs "24:$frac:128,12:$frac:128" --ops dispatch_bf16,dispatch_fp8,cached_bf16,dispatch_bf16_nospec,combine \
          --json "$OUT/profile_normal.json" > "$OUT/profile_normal.txt" 2>&1
      echo "profile_normal.py: exit $?"; tail -25 "$OUT/profile_normal.txt"
    else
      echo "profile_normal.py skipped: ${pl}s left"
    fi
  fi
  # Per-phase timeline of the low-latency kernels (docs/design.md)
  pl=$(( $(left) - 5 ))
  if (( pl >= 45 )); then
    EPCOMM_PROFILE=1 timeout -k 5 "$(min 120 "$pl")" python3 benchmarks/profile_low_latency.py \
        --json "$OUT/profile_low_latency.json" > "$OUT/profile_low_latency.txt" 2>&1
    echo "profile_low_latency.py: exit $?"; tail -30 "$OUT/profile_low_latency.txt"
  else
    echo "profile_low_latency.py skipped: ${pl}s left"
  fi
  echo "bench session: ${SECONDS}s"
fi
