#!/usr/bin/env bash
# The GPU checks not yet run on the current tree, in the order to take them, for one device
# call each (at most 600 s): pick with ONLY=<regex of step names> and pass the budget, e.g.
#   BUDGET=580 ONLY='^(warmup|compiled)' EPCOMM_GIT_COMMIT=<sha> bash benchmarks/gpu_owed.sh
# Logs and a summary under $OUT (benchmarks/gpu_steps.sh).  Ranks share one GPU where only one
# is visible: these runs check results, not speed.  Measured on one H100 with 2 ranks (steps of
# that size): warm-up 22 s on a cold cache, the jax + torch compiled files 47 s, the torch
# example 32 s, the torch overhead benchmark 39 s, the 2-rank soak 92 s, the fault file 115 s,
# the intranode file ~90 s, the low-latency file ~280 s; 4 ranks take about twice as long.
# So five calls of at most ~500 s expected: ONLY='^(warmup|ll_alt|soak2$|compiled|faults2)' (~490 s),
# then '^(warmup|soak2_|soak4|faults4)' (~500 s), then '^(warmup|faults8)' (8 ranks: about four
# times the 2-rank time, a call of its own), then '^(warmup|fuzz|normal)', then '^(warmup|ll2)'.
# (Both fault steps with soak4 in one call came to ~650 s expected, fuzz + normal + ll2 to ~600 s:
# past a call's 575 s budget, the last steps would have been cut or skipped.)
# Each pytest step's EPCOMM_TEST_TIMEOUT (one spawn's limit: 480 s by default, at most 240 s in the
# fault file) leaves the step's other spawns room within its limit (the compiled files: a step
# each, one spawn each): a hang is then reported by its spawn (the stalled ranks, their phases and
# stacks) instead of being cut by the step's limit.  A step cut anyway still prints pytest's failures so
# far (tests/conftest.py takes the SIGTERM of `timeout` as an interrupt).
source "$(dirname "$0")/gpu_steps.sh"
P="python3 -m pytest -q -rs -p no:cacheprovider"
step warmup 90 python3 -m epcomm.tools.cli warmup --preset tests --smoke -j 16
# The low-latency message tags (slot bit): the test of shapes alternating between the slots, and
# the soak whose seed 1 found the stale headers (0 mismatches expected).
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=100 step ll_alternating 120 $P tests/gpu/test_low_latency_gpu.py -k alternating
step soak2 250 python3 benchmarks/soak.py --ranks 2 --calls 10000 --seed 1 --time-limit 240 --json "$OUT/soak-2ranks.json"
# Compiled programs (torch.compile: the order token, CUDA graph trees of the low-latency pair).
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=80 step compiled2_jax 95 $P tests/gpu/test_jax_jit_gpu.py
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=110 step compiled2_torch 125 $P tests/gpu/test_torch_compile_gpu.py
step compiled_example 70 python3 examples/torch_compile_moe.py
step compiled_overhead 100 python3 benchmarks/torch_compile_overhead.py --ranks 2 --timeout 85 --json "$OUT/torch_compile_overhead.json"
EPCOMM_TEST_RANKS=4 EPCOMM_TEST_TIMEOUT=140 step compiled4_jax 160 $P tests/gpu/test_jax_jit_gpu.py
EPCOMM_TEST_RANKS=4 EPCOMM_TEST_TIMEOUT=180 step compiled4_torch 200 $P tests/gpu/test_torch_compile_gpu.py
# Failures: the soak (2 ranks, then 4), fault injection at 4 ranks, with the index checks off,
# and the GPU fuzz; fault injection at 8 ranks.
step soak2_seed2 250 python3 benchmarks/soak.py --ranks 2 --calls 10000 --seed 2 --time-limit 240 --json "$OUT/soak-2ranks-seed2.json"
step soak4 400 python3 benchmarks/soak.py --ranks 4 --calls 2000 --seed 1 --time-limit 390 --json "$OUT/soak-4ranks.json"
EPCOMM_TEST_RANKS=4 step faults4 500 $P tests/gpu/test_fault_injection_gpu.py
EPCOMM_TEST_RANKS=2 EPCOMM_CHECK_INDICES=0 EPCOMM_TEST_TIMEOUT=90 step faults2_nocheck 200 $P tests/gpu/test_fault_injection_gpu.py
EPCOMM_TEST_RANKS=8 EPCOMM_TEST_TIMEOUT=150 step faults8 590 $P tests/gpu/test_fault_injection_gpu.py
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=230 step fuzz2 250 $P tests/gpu/test_fuzz_gpu.py
EPCOMM_TEST_RANKS=4 EPCOMM_TEST_TIMEOUT=380 step fuzz4 400 $P tests/gpu/test_fuzz_gpu.py
# The default suites on the current kernels (the rank-mask pointer and shrink deadlines).
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=200 step normal2 300 $P tests/gpu/test_smoke_gpu.py tests/gpu/test_layout_gpu.py tests/gpu/test_interop_gpu.py tests/gpu/test_timing_gpu.py tests/gpu/test_intranode_gpu.py
EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=300 step ll2 450 $P tests/gpu/test_low_latency_gpu.py
EPCOMM_PEER_MEMORY=vmm EPCOMM_TEST_RANKS=2 EPCOMM_TEST_TIMEOUT=200 step normal2_vmm 300 $P tests/gpu/test_intranode_gpu.py
cat "$OUT/summary.txt" 2>/dev/null
