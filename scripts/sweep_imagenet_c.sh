#!/usr/bin/env bash
# Baseline and TTT-MAE on every ImageNet-C corruption, then the summary table.
#
# Usage:
#   scripts/sweep_imagenet_c.sh DATA_ROOT OUTPUT_ROOT RESUME_MODEL RESUME_FINETUNE \
#       [--severity 5] [--corruptions "a b c"] [--only baseline|ttt] [--finetuned CKPT [--finetuned_model NAME]]
#       [--joint CKPT] [-- extra flags for the python scripts]
#
#   DATA_ROOT/<corruption>/<severity>/ is read; OUTPUT_ROOT/<corruption>/ gets the TTT run and
#   OUTPUT_ROOT/<corruption>/baseline/ the baseline (the released README's layout). A run whose
#   results.json says "complete": true is skipped, so rerunning the same command resumes the sweep
#   (a failing run stops it). --only baseline runs the baselines alone (one forward pass per image: the
#   cheap first check of a reproduction, docs/reproduce.md), --only ttt the TTT-MAE runs alone.
#   The paper's other rows without adaptation, each with the baselines: --finetuned CKPT evaluates MAE's
#   fine-tuned ViT (e.g. mae_finetuned_vit_large.pth, --finetuned_model vit_large_patch16 by default) into
#   OUTPUT_ROOT/<corruption>/finetuned/, --joint CKPT a jointly trained MAE (main_pretrain.py --joint_weight)
#   into OUTPUT_ROOT/<corruption>/joint/.
#   Each extra flag goes to the scripts that take it (--max_examples to both, --steps_per_example to the
#   TTT run only, a flag neither takes is an error before any run). The paper's flags are passed first,
#   so extra flags override them (argparse keeps the last value):
#     scripts/sweep_imagenet_c.sh imagenet-c out ckpt/mae.pth ckpt/probe.pth -- --max_examples 500
#
# Environment:
#   PYTHON    the interpreter (default: python)
#   LAUNCHER  what runs the python scripts (default: $PYTHON), e.g. on one 8-GPU node:
#               LAUNCHER="torchrun --nproc_per_node=8" scripts/sweep_imagenet_c.sh ...
#   SLURM_ARRAY_TASK_ID  run only the corruption with this index (0-based) in the list: one job per
#             corruption, as scripts/imagenet_c.sbatch submits them. Each task ends by collecting whatever
#             has finished; rerun the collector when all are done: python scripts/collect_results.py out
set -euo pipefail

usage() { sed -n '4,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 4 ]] || usage
DATA_ROOT=$1 OUTPUT_ROOT=$2 RESUME_MODEL=$3 RESUME_FINETUNE=$4
shift 4
SEVERITY=5
ONLY=
FINETUNED=
FINETUNED_MODEL=vit_large_patch16
JOINT=
CORRUPTIONS="gaussian_noise shot_noise impulse_noise defocus_blur glass_blur motion_blur zoom_blur
snow frost fog brightness contrast elastic_transform pixelate jpeg_compression"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --severity) [[ $# -ge 2 ]] || die "--severity needs a value"; SEVERITY=$2; shift 2 ;;
        --corruptions) [[ $# -ge 2 ]] || die "--corruptions needs a value"; CORRUPTIONS=$2; shift 2 ;;
        --only) [[ $# -ge 2 && ($2 == baseline || $2 == ttt) ]] || die "--only takes baseline or ttt"; ONLY=$2; shift 2 ;;
        --finetuned) [[ $# -ge 2 ]] || die "--finetuned needs a checkpoint"; FINETUNED=$2; shift 2 ;;
        --finetuned_model) [[ $# -ge 2 ]] || die "--finetuned_model needs a name"; FINETUNED_MODEL=$2; shift 2 ;;
        --joint) [[ $# -ge 2 ]] || die "--joint needs a checkpoint"; JOINT=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1 (flags for the python scripts go after --)" ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
read -r -a LAUNCH <<< "${LAUNCHER:-$PY}"
read -r -d '' -a LIST <<< "$CORRUPTIONS" || true  # split on any whitespace, newlines included
[[ ${#LIST[@]} -gt 0 ]] || die "--corruptions is empty"
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    [[ $SLURM_ARRAY_TASK_ID =~ ^[0-9]+$ && $SLURM_ARRAY_TASK_ID -lt ${#LIST[@]} ]] || die "SLURM_ARRAY_TASK_ID=$SLURM_ARRAY_TASK_ID is not an index into the ${#LIST[@]} corruptions (0..$((${#LIST[@]} - 1)))"
    LIST=("${LIST[$SLURM_ARRAY_TASK_ID]}")
fi

# Each extra flag goes to the scripts that take it; one that neither takes stops the sweep here.
ROUTED=$(mktemp -d)
trap 'rm -rf "$ROUTED"' EXIT
"$PY" "$REPO/scripts/split_sweep_flags.py" "$ROUTED/baseline" "$ROUTED/ttt" -- ${EXTRA[@]+"${EXTRA[@]}"} || exit 2
mapfile -d '' -t BASELINE_EXTRA < "$ROUTED/baseline"
mapfile -d '' -t TTT_EXTRA < "$ROUTED/ttt"
# Check every input before the first (long) run starts.
for f in "$RESUME_MODEL" "$RESUME_FINETUNE" $FINETUNED $JOINT; do [[ -f $f ]] || die "checkpoint not found: $f"; done
for c in "${LIST[@]}"; do [[ -d $DATA_ROOT/$c/$SEVERITY ]] || die "data folder not found: $DATA_ROOT/$c/$SEVERITY"; done

# The paper's settings (the released README's commands); the baseline takes only the model's.
MODEL_FLAGS=(--model mae_vit_large_patch16 --head_type vit_head --classifier_depth 12)
TTT_FLAGS=(--norm_pix_loss --single_crop --batch_size 128 --steps_per_example 20 --blr 1e-2
           --mask_ratio 0.75 --optimizer_type sgd --finetune_mode encoder)

complete() {  # is $1/results.json there with "complete": true?
    [[ -f $1/results.json ]] && "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("complete") is not True)' "$1/results.json"
}

run() {  # run LABEL SCRIPT OUTPUT_DIR FLAGS...: one run on corruption $c, skipped when already complete
    local label=$1 script=$2 out=$3
    shift 3
    if complete "$out"; then
        echo "== $c: $label already complete"
        return
    fi
    echo "== $c: $label"
    "${LAUNCH[@]}" "$REPO/$script" --data_path "$DATA_ROOT/$c/$SEVERITY" --output_dir "$out" "$@"
}
CKPTS=(--resume_model "$RESUME_MODEL" --resume_finetune "$RESUME_FINETUNE")

for c in "${LIST[@]}"; do
    if [[ $ONLY != ttt ]]; then
        run baseline test_without_adaptation.py "$OUTPUT_ROOT/$c/baseline" "${CKPTS[@]}" "${MODEL_FLAGS[@]}" \
            ${BASELINE_EXTRA[@]+"${BASELINE_EXTRA[@]}"}
        # the fine-tuned ViT's name goes last: an extra --model is the MAE's
        [[ -z $FINETUNED ]] || run "fine-tuned ViT" test_without_adaptation.py "$OUTPUT_ROOT/$c/finetuned" \
            --resume_finetune "$FINETUNED" ${BASELINE_EXTRA[@]+"${BASELINE_EXTRA[@]}"} --model "$FINETUNED_MODEL"
        [[ -z $JOINT ]] || run "joint training" test_without_adaptation.py "$OUTPUT_ROOT/$c/joint" \
            --resume_model "$JOINT" --resume_finetune "$JOINT" "${MODEL_FLAGS[@]}" ${BASELINE_EXTRA[@]+"${BASELINE_EXTRA[@]}"}
    fi
    [[ $ONLY == baseline ]] || run TTT-MAE main_test_time_training.py "$OUTPUT_ROOT/$c/" "${CKPTS[@]}" \
        "${MODEL_FLAGS[@]}" "${TTT_FLAGS[@]}" ${TTT_EXTRA[@]+"${TTT_EXTRA[@]}"}
done

"$PY" "$REPO/scripts/collect_results.py" "$OUTPUT_ROOT"
