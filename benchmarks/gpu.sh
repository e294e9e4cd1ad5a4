#!/usr/bin/env bash
# The GPU check of issue 12 in one command, for a short loan of a CUDA machine: sparsealign vs TRL's
# DPOTrainer in bf16-mixed on SmolLM2-135M-Instruct and a random 1.2B Llama, with tokens/s, peak CUDA memory
# and MFU; the JSON report lands in ${OUT:-.}/vs_trl_gpu.json. The whole run stops after LIMIT seconds
# (default 540), so a 10-minute call always returns.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-540}
OUTDIR=${OUT:-.}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__)"
timeout "$LIMIT" python benchmarks/vs_trl.py --quick --device cuda --precision bf16-mixed \
    --models smollm2-135m-instruct llama-1b-random --json "$OUTDIR/vs_trl_gpu.json" 2>&1 | tee "$OUTDIR/vs_trl_gpu.log"
