#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (CI has none): the CUDA tests and the GPU benchmarks.
# Each part has its own time limit and writes its output to OUT_DIR/<part>.txt.
#
#   bash bench/gpu_checks.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_checks.sh OUT_DIR}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
OUT=$(realpath -m "$OUT")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, output appended to OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*" | tee -a "$OUT/$name.txt"
    timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch, timm, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)'; } > "$OUT/machine.txt" 2>&1
part cuda_tests 150 "$PYTHON" -m pytest -q -rs -m cuda tests
part bench 180 "$PYTHON" bench/bench_ttt.py --model mae_vit_large_patch16 --batch_size 128 --steps 20 \
    --images 4 --amp none bf16 --naive
part bench 45 "$PYTHON" bench/bench_pretrain.py --model mae_vit_large_patch16 --batch_size 64 --device cuda
part bench 45 "$PYTHON" bench/bench_ttt.py --model mae_vit_tiny_patch4 --batch_size 16 --steps 20 \
    --images 32 --image_size 32 --parallel_images 1 32
