#!/usr/bin/env bash
# The GPU smoke run (issue 19): random-weight models at real sizes (open_clip ViT-L-14, a BLIP-large-shaped
# captioner, the ViT-L-14 recipe's prior and adapter), 2,000 generated images embedded and captioned, 200 steps
# of stage 1 and stage 2 in bf16 through Accelerate, 10,000 sampled queries, and an evaluation on a fake CIRR
# tree (the official val annotation files, generated images). Prints throughput and peak GPU memory per step;
# exits non-zero on any failure. Extra arguments go to `fusion-diff smoke` (e.g. --out, --cirr-annotations).
#   scripts/gpu_smoke.sh [--precision fp16] [--out runs/smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusion_diff.cli smoke --device cuda --profile real "$@"
