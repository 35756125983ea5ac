#!/usr/bin/env bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 EPCOMM_CACHE_DIR=/tmp/epcomm-cache XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
ngpu=$(nvidia-smi -L | wc -l)
export EPCOMM_BENCH_KIND="nvidia-h200-x$ngpu"
L=$OUT/log.txt
python3 -m epcomm.cli warmup --preset tests --ranks $ngpu --smoke -j 16 >> $L 2>&1; tail -1 $L
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_timing_gpu.py >> $L 2>&1; tail -2 $L
timeout 300 python3 -m epcomm.cli bench all --json $OUT/bench.json > $OUT/bench.txt 2>&1; tail -40 $OUT/bench.txt
timeout 120 python3 -m epcomm.cli bench normal --sms 12 --json $OUT/bench12.json >> $L 2>&1; grep -A3 " SMs" $L | tail -3
EPCOMM_PROFILE=1 timeout 200 python3 benchmarks/profile_normal.py --configs ${PROFILE_CONFIGS:-24:0.25:128,24:0.29:128,24:0.33:128,24:0.4:128,24:0.5:128,12:0.25:128,12:0.33:128,12:0.5:128} --ops dispatch_bf16,dispatch_fp8,cached_bf16,combine --json $OUT/profile.json 2>&1 | grep "^r0" | sed -e 's/host enter.*outputs_ready=[-0-9]* |//' -e 's/last start [0-9]*, //g' -e 's/ 19[0-9][0-9] MHz,//g'
