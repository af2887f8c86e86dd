#!/usr/bin/env bash
# GPU checks on CUDA (FSDP1 FSDPStrategy; QLoRA: BitsandbytesPrecision, FSDP2 over a 4-bit base), as one command:
#   bash tests/gpu/run_gpu_checks.sh
# Uses up to 2 GPUs (1 is enough). Needs a CUDA build of torch; about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, '-', torch.cuda.device_count(), 'GPU(s)')"
exec "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rs "$@"
