#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (CI has none): the CUDA tests, the profile and the
# benchmarks at the paper's setting, and the accuracy effect of the fast modes on the example's model.
# Each part has its own time limit and writes its output to OUT_DIR/<part>.txt (JSON beside it).
#
#   bash bench/gpu_checks.sh OUT_DIR                          # every part: up to 20 min by the limits
#   bash bench/gpu_checks.sh OUT_DIR tests profile bench      # or in two calls of under 10 min each:
#   bash bench/gpu_checks.sh OUT_DIR example accuracy pretrain
#
# The accuracy part runs the example's corruption stages on the GPU over a demo_out/ that `make demo`
# made on a CPU (carry it to the GPU machine), 100 test images per corruption, in three modes: the
# default loop, --compile --parallel_images 4, and --amp bf16; then bench/accuracy_effect.py.
set -uo pipefail
OUT=${1:?usage: bench/gpu_checks.sh OUT_DIR [tests profile bench example accuracy pretrain]}
shift
ALL='tests profile bench example accuracy pretrain'
PARTS=${*:-$ALL}
for p in $PARTS; do
    [[ " $ALL " == *" $p "* ]] || { echo "error: unknown part '$p' (choose from: $ALL)" >&2; exit 2; }
done
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
OUT=$(realpath -m "$OUT")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
FAILED=''
part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, output appended to OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name: $*" | tee -a "$OUT/$name.txt"
    timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
    (( status == 0 )) || FAILED+=" $name"
}
wants() { [[ " $PARTS " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch, timm, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)'; } > "$OUT/machine.txt" 2>&1
PAPER=(--model mae_vit_large_patch16 --batch_size 128 --steps 20)
wants tests && part cuda_tests 150 "$PYTHON" -m pytest -q -rs -m cuda tests
wants profile && part profile 150 "$PYTHON" bench/profile_ttt.py "${PAPER[@]}" --modes default compile bf16 \
    compile+bf16 --json "$OUT/profile.json"
wants bench && part bench 240 "$PYTHON" bench/bench_ttt.py "${PAPER[@]}" --images 4 --repeats 2 \
    --modes default compile bf16 compile+bf16 --naive --json "$OUT/h200.json"
wants example && part example 60 "$PYTHON" bench/bench_ttt.py --model mae_vit_tiny_patch4 --image_size 32 \
    --batch_size 16 --steps 20 --images 32 --modes default compile+K4 K32 compile+K32 --naive \
    --json "$OUT/h200-example.json"
if wants accuracy; then
    if [[ -f demo_out/probe/checkpoint-final.pth ]]; then
        for mode in "default 1 0 none" "compile+K4 4 1 none" "bf16 1 0 bf16"; do
            read -r name k compile amp <<< "$mode"
            part accuracy 240 env DEMO_TTT_DEVICE=cuda DEMO_ONLINE=0 DEMO_RECONSTRUCTIONS=0 \
                DEMO_TTT_MAX_EXAMPLES=100 DEMO_TTT_PARALLEL="$k" DEMO_TTT_COMPILE="$compile" DEMO_TTT_AMP="$amp" \
                DEMO_RESULTS="$OUT/accuracy/$name" bash scripts/demo.sh
        done
        part accuracy 30 "$PYTHON" bench/accuracy_effect.py "$OUT/accuracy/default" \
            "compile+K4=$OUT/accuracy/compile+K4" "bf16=$OUT/accuracy/bf16" --steps 0 1 2 5 10 \
            --json "$OUT/accuracy.json"
    else
        echo "== accuracy: skipped, no demo_out/ (run make demo on a CPU and carry demo_out)" | tee "$OUT/accuracy.txt"
    fi
fi
wants pretrain && part pretrain 45 "$PYTHON" bench/bench_pretrain.py --model mae_vit_large_patch16 \
    --batch_size 64 --device cuda
[[ -z $FAILED ]] || { echo "failed or timed out:$FAILED" >&2; exit 1; }
