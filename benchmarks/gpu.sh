#!/usr/bin/env bash
# DMIL against joint learning on one CUDA GPU, in bf16: a few hundred bare training steps (forward with labels,
# backward, fused AdamW) per method on three models -- make run's head alone on cached tower outputs
# (main-job-head), make run's stage-3 step with its tiny vision tower live (main-job), and tiny text, vision and audio
# towers all live (tiny) -- giving samples/s and each method's peak GPU memory, written to benchmarks/gpu.json
# (`dmil profile --train-step`, see dmil_hf/profiling.py).
#
# Usage, from anywhere, on a fresh GPU machine with this repository and a CUDA build of torch (>=2.4,<2.14):
#   benchmarks/gpu.sh [--steps N] [--batch-size N] [--output PATH]
#   benchmarks/gpu.sh --dry-run      # the same on the CPU, 3 steps, into runs/gpu-dry-run.json: checks the script
# No network is used. dmil_hf runs from the repository; if a dependency of pyproject.toml is missing, it is installed
# from the repository with `pip install --no-index` (put the wheels in a folder and set WHEELHOUSE to it).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

dry_run=0 steps="" batch_size="" output=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --steps|--batch-size|--output)
      [ $# -ge 2 ] || { echo "benchmarks/gpu.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in --steps) steps=$2 ;; --batch-size) batch_size=$2 ;; --output) output=$2 ;; esac
      shift ;;
    *) echo "benchmarks/gpu.sh: unknown option '$1' (expected --dry-run, --steps N, --batch-size N, --output PATH)" >&2
       exit 2 ;;
  esac
  shift
done
if [ "$dry_run" = 1 ]; then
  device=cpu; steps=${steps:-3}; batch_size=${batch_size:-8}; output=${output:-runs/gpu-dry-run.json}
else
  device=cuda; steps=${steps:-300}; batch_size=${batch_size:-64}; output=${output:-benchmarks/gpu.json}
  "$PYTHON" - <<'PY' || exit 1
import sys

try:
    import torch
except ImportError:
    sys.exit("benchmarks/gpu.sh: torch is not installed; install a CUDA build of torch (>=2.4,<2.14) first.")
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is "
             "False). Run it on a GPU machine, or pass --dry-run to check the script on the CPU.")
PY
fi

if ! "$PYTHON" -c "import dmil_hf.cli, dmil_hf.profiling" 2>/dev/null; then
  echo "benchmarks/gpu.sh: installing dmil_hf from $(pwd) without the network" >&2
  "$PYTHON" -m pip install --no-index --no-build-isolation ${WHEELHOUSE:+--find-links "$WHEELHOUSE"} -e . || {
    echo "benchmarks/gpu.sh: could not install dmil_hf offline: a dependency of pyproject.toml is missing. Install" \
         "the wheels it names (transformers, datasets, accelerate, ...) or set WHEELHOUSE to a folder holding them." >&2
    exit 1
  }
fi

mkdir -p "$(dirname "$output")"
"$PYTHON" -m dmil_hf.cli profile --train-step --setups main-job-head main-job tiny --methods joint dmil \
  --precision bf16 --batch-size "$batch_size" --repeats "$steps" --device "$device" --output "$output"
echo "benchmarks/gpu.sh: wrote $output"
