#!/usr/bin/env bash
# The GPU check of issue 12 in one command, for a short loan of a CUDA machine: the host-device syncs inside
# one step (benchmarks/gpu_syncs.py), then sparsealign vs TRL's DPOTrainer in bf16-mixed on
# SmolLM2-135M-Instruct and a random 1.2B Llama, with tokens/s, peak CUDA memory and MFU; the JSON reports land
# in ${OUT:-.}. The comparison stops after LIMIT seconds (default 420) and each sync check after 60: under 10 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-420}
OUTDIR=${OUT:-.}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__)"
for method in dpo sparsepo; do  # host-device syncs inside one step (expected: none)
    timeout 60 python benchmarks/gpu_syncs.py --method "$method" | tee "$OUTDIR/gpu_syncs_$method.json" || true
done
timeout "$LIMIT" python benchmarks/vs_trl.py --quick --device cuda --precision bf16-mixed \
    --models smollm2-135m-instruct llama-1b-random --json "$OUTDIR/vs_trl_gpu.json" 2>&1 | tee "$OUTDIR/vs_trl_gpu.log"
