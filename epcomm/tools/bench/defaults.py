"""The defaults of ``epcomm bench`` (the CLI's and :func:`epcomm.tools.bench.run`'s): the
DeepSeek-V3 shape, the iterations, the normal-mode SM sweep and the start aligner's modes."""
from __future__ import annotations

DEFAULT_SMS = (8, 12, 16, 24, 32)  # normal-mode SM counts swept
NORMAL_TOKENS = 4096               # tokens per rank, normal mode
LL_TOKENS = 128                    # tokens per rank, low-latency mode
HIDDEN = 7168
TOPK = 8
EXPERTS = 256
ITERS = 30                         # timed iterations per operation (per rank the median)
WARMUP = 5                         # untimed calls before them (normal and internode modes)
# Ranks sharing a GPU (internode mode, EPCOMM_SHARE_GPU=1) take turns on it, so their timings
# mean nothing: a few calls check the results and keep the run short.
SHARED_GPU_ITERS = 5
SHARED_GPU_WARMUP = 1
SPAWN_TIMEOUT_S = 540.0            # seconds each mode's spawn may take
ALIGNER_MODES = ("clock", "wall")  # see epcomm.tools.bench.aligner.Aligner
