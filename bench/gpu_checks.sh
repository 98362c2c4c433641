#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (CI has no GPU): the CUDA tests, the
# benchmarks behind the README's GPU table and, optionally, a validation sweep of the demo's
# settings (scripts/demo_sweep.sh). Every part has its own time limit and writes its output under
# OUT_DIR (the sweep's runs go to their DEMO_OUT folders; an archive of their logs and tables to OUT_DIR).
#
#   bash bench/gpu_checks.sh OUT_DIR [SWEEP_SETTINGS SWEEP_DATA [DEADLINE]]
#
# DEADLINE: seconds after the start by which the sweep is stopped (default 540), so that its
# summary and archive come back within one call of a time-limited machine.
set -uo pipefail
OUT=${1:?usage: bench/gpu_checks.sh OUT_DIR [SWEEP_SETTINGS SWEEP_DATA [DEADLINE]]}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
OUT=$(realpath -m "$OUT")
SETTINGS=${2:+$(realpath "$2")}
DATA=${3:+$(realpath -m "$3")}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, output to OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*" | tee -a "$OUT/$name.txt"
    timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch, timm, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)'; } > "$OUT/machine.txt" 2>&1
part cuda_tests 120 "$PYTHON" -m pytest -q -rs tests/test_engine_test_time.py -k cuda
part bench 180 "$PYTHON" bench/bench_ttt.py --model mae_vit_large_patch16 --batch_size 128 --steps 20 \
    --images 4 --amp none bf16 --naive
part bench 45 "$PYTHON" bench/bench_pretrain.py --model mae_vit_large_patch16 --batch_size 64 --device cuda
part bench 45 "$PYTHON" bench/bench_ttt.py --model mae_vit_tiny_patch4 --batch_size 16 --steps 20 \
    --images 32 --image_size 32 --parallel_images 1 32

left=$(( ${4:-540} - SECONDS ))
if [[ -n $DATA ]] && (( left > 0 )); then
    export DEMO_DEVICE=${DEMO_DEVICE:-cuda} DEMO_TTT_PARALLEL=${DEMO_TTT_PARALLEL:-100}
    part sweep "$left" bash scripts/demo_sweep.sh "$SETTINGS" "$DATA" "$OUT/sweep.md" 8
    # logs, tables and per-step JSON; not the checkpoints and per-image arrays (too big to bring back)
    mapfile -t folders < <(sed 's/#.*//' "$SETTINGS" | grep -o 'DEMO_OUT=[^[:space:]]*' | cut -d= -f2- | sort -u)
    tar czf "$OUT/sweep.tgz" --exclude='*.pth' --exclude='*.npz' --exclude='*.npy' --exclude='digits*' \
        --exclude='events.*' "${folders[@]}" 2>> "$OUT/sweep.txt"
fi
