#!/usr/bin/env bash
# What needs a CUDA GPU (CI has none), in calls of a time budget each: a call stops after
# $GPU_CHECKS_BUDGET_S seconds (420 unless set), keeping what finished.
#
#   bash bench/gpu_checks.sh OUT_DIR                                # what matters most, ~6 min:
#       the cuda-marked tests, then the paper's setting (ViT-L/16, 224 px, batch 128, 20 steps, random
#       weights), 2 images after warm-up in each mode: the default loop, the released-style loop, random-crop
#       views, --compile, --compile --amp bf16, the released-style loop in bf16 -> OUT_DIR/<gpu>.json, named
#       after the GPU (e.g. nvidia-h100-80gb-hbm3.json; cpu.json with --smoke)
#   bash bench/gpu_checks.sh OUT_DIR profile accuracy pretrain      # the optional parts, a second call
#   bash bench/gpu_checks.sh OUT_DIR [PARTS] --plan                 # print the plan and stop
#   bash bench/gpu_checks.sh OUT_DIR [PARTS] --smoke                # on the CPU, a tiny model, seconds: the
#                                                                   # script's own test (tests/test_bench.py)
#
# It prints its plan, an estimate per part, before it starts. Each part writes OUT_DIR/<part>.txt (and its
# JSON) under a time limit, cut to what is left of the budget; the benchmark rewrites its JSON after every
# mode, so a part cut short keeps what finished. The accuracy part runs the example's corruption stages on
# the GPU over a demo_out/ made by `make demo` on a CPU (carry it), 50 images per corruption, in the default
# loop, --compile --parallel_images 4 and --amp bf16, then bench/accuracy_effect.py.
set -uo pipefail
usage='usage: bench/gpu_checks.sh OUT_DIR [tests bench profile accuracy pretrain] [--plan] [--smoke]'
OUT=${1:?$usage}
shift
declare -A ESTIMATE=([tests]=120 [bench]=240 [profile]=120 [accuracy]=240 [pretrain]=30)  # seconds on an H200
declare -A LIMIT=([tests]=180 [bench]=300 [profile]=180 [accuracy]=300 [pretrain]=60)
declare -A WHAT=([tests]='the cuda-marked tests'
                 [bench]='paper setting -> <gpu>.json: set-up 15 s, default 15, released 20, crops 20, compile 75, '\
'compile+bf16 75, released+bf16 20'
                 [profile]='where the time goes, default and compile+bf16 -> profile.json'
                 [accuracy]="three modes' accuracy on the example -> accuracy.json"
                 [pretrain]='pre-training throughput')
PARTS='' PLAN_ONLY=0 SMOKE=0
for a in "$@"; do
    case $a in
        --plan) PLAN_ONLY=1 ;;
        --smoke) SMOKE=1 ;;
        *) [[ -v ESTIMATE[$a] ]] || { echo "error: unknown part '$a' ($usage)" >&2; exit 2; }
           PARTS+=" $a" ;;
    esac
done
PARTS=${PARTS:-tests bench}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
BUDGET=${GPU_CHECKS_BUDGET_S:-420}

total=0
echo "plan (estimates on an H200; each call stops after $BUDGET s):"
for p in tests bench profile accuracy pretrain; do  # the order they run in
    wants "$p" || continue
    printf '  %-9s ~%4d s (limit %d s): %s\n' "$p" "${ESTIMATE[$p]}" "${LIMIT[$p]}" "${WHAT[$p]}"
    (( total += ESTIMATE[$p] ))
done
echo "  total     ~$total s"
if (( total > BUDGET )); then
    echo "error: ~$total s is over one call's $BUDGET s: split the parts (bench/gpu_checks.sh's header)" >&2
    exit 2
fi
(( PLAN_ONLY )) && exit 0
(( SMOKE )) && echo "--smoke: the same commands on the CPU, a tiny model, no compiling (a minute there)"

export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
OUT=$(realpath -m "$OUT")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
if (( SMOKE )); then
    DEVICE=cpu MODEL=(--model mae_vit_tiny_patch4 --batch_size 4 --steps 2)
    MODES=(default released crops) PROFILE_MODES=(default) IMAGES=1 PRETRAIN=(--model mae_vit_tiny_patch4 --iters 1)
else
    DEVICE=cuda MODEL=(--model mae_vit_large_patch16 --batch_size 128 --steps 20)
    MODES=(default released crops compile compile+bf16 released+bf16) PROFILE_MODES=(default compile+bf16) IMAGES=2
    PRETRAIN=(--model mae_vit_large_patch16 --batch_size 64)
fi
FAILED=''
declare -A END  # when each part's limit runs out, from its first command on
part() {  # part NAME COMMAND...: run COMMAND, output appended to OUT/NAME.txt, within its limit and the budget
    local name=$1 start=$SECONDS status limit
    shift
    [[ -v END[$name] ]] || END[$name]=$(( SECONDS + LIMIT[$name] ))
    limit=$(( (END[$name] < BUDGET - 5 ? END[$name] : BUDGET - 5) - SECONDS ))  # 5 s: timeout's -k below
    if (( limit < 10 )); then
        echo "== $name: skipped, its limit or the call's $BUDGET s are spent" | tee -a "$OUT/$name.txt"
        FAILED+=" $name"
        return
    fi
    echo "== $name (limit $limit s): $*" | tee -a "$OUT/$name.txt"
    timeout -k 5 "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
    (( status == 0 )) || FAILED+=" $name"
}

# the versions of torch and the rest are in each part's JSON
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/machine.txt" 2>&1
if (( SMOKE )); then GPU=cpu; else GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1); fi
GPU=$(tr '[:upper:]' '[:lower:]' <<< "${GPU:-unknown-gpu}" | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
if wants tests; then
    if (( SMOKE )); then
        echo "== tests: not in --smoke (they need a GPU)" | tee "$OUT/tests.txt"
    else
        part tests "$PYTHON" -m pytest -q -rs -m cuda tests
    fi
fi
wants bench && part bench "$PYTHON" bench/bench_ttt.py "${MODEL[@]}" --images "$IMAGES" --repeats 1 \
    --modes "${MODES[@]}" --device "$DEVICE" --json "$OUT/$GPU.json"
wants profile && part profile "$PYTHON" bench/profile_ttt.py "${MODEL[@]}" --modes "${PROFILE_MODES[@]}" \
    --device "$DEVICE" --json "$OUT/profile.json"
if wants accuracy; then
    if [[ -f demo_out/probe/checkpoint-final.pth ]]; then
        for mode in "default 1 0 none" "compile+K4 4 1 none" "bf16 1 0 bf16"; do
            read -r name k compile amp <<< "$mode"
            part accuracy env DEMO_TTT_DEVICE="$DEVICE" DEMO_ONLINE=0 DEMO_RECONSTRUCTIONS=0 \
                DEMO_TTT_MAX_EXAMPLES=50 DEMO_TTT_PARALLEL="$k" DEMO_TTT_COMPILE="$compile" DEMO_TTT_AMP="$amp" \
                DEMO_RESULTS="$OUT/accuracy/$name" bash scripts/demo.sh
        done
        part accuracy "$PYTHON" bench/accuracy_effect.py "$OUT/accuracy/default" \
            "compile+K4=$OUT/accuracy/compile+K4" "bf16=$OUT/accuracy/bf16" --steps 0 1 2 5 10 \
            --json "$OUT/accuracy.json"
    else
        echo "== accuracy: skipped, no demo_out/ (run make demo on a CPU and carry demo_out)" | tee "$OUT/accuracy.txt"
        FAILED+=' accuracy'
    fi
fi
wants pretrain && part pretrain "$PYTHON" bench/bench_pretrain.py "${PRETRAIN[@]}" --device "$DEVICE"
[[ -z $FAILED ]] || { echo "failed, skipped or cut short:$FAILED" >&2; exit 1; }
