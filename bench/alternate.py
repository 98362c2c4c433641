"""Two checkouts' speed, timed in turns in one session: bench/bench_ttt.py of each checkout on its own code,
alternated round after round, so that a drift of the machine (another load, a warmer cache) falls on both.
Prints each mode's median seconds per image and the spread of its repeats, before and after, and writes
every repeat as JSON.

  git worktree add /tmp/before COMMIT
  python bench/alternate.py --before /tmp/before --after . --rounds 4 --json bench/results/cpu-2core-HEAD.json \\
      -- --model mae_vit_tiny_patch4 --image_size 32 --batch_size 16 --steps 20 --images 16 --repeats 3 \\
         --modes default compile+K4
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import print_table  # noqa: E402
from util.cli import UserError, run_main  # noqa: E402
from util.io import write_json  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--before', required=True, help='the checkout timed first in every round')
    parser.add_argument('--after', required=True, help='the checkout timed second')
    parser.add_argument('--rounds', default=4, type=int, help='rounds of one bench_ttt.py run per checkout')
    parser.add_argument('--json', default=None, help='every repeat and the summary, rewritten after every run')
    parser.add_argument('bench_args', nargs=argparse.REMAINDER, help="after --: bench/bench_ttt.py's flags")
    return parser


def commit(folder):
    done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=folder, capture_output=True, text=True)
    dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=folder, capture_output=True, text=True).stdout
    return done.stdout.strip() + (' (with uncommitted changes)' if dirty.strip() else '')


def summary(runs):
    """{mode: {side: {'median', 'min', 'max', 'repeats'}}} of every repeat's seconds per image."""
    table = {}
    for side, results in runs.items():
        for result in results:
            for row in result['rows']:
                table.setdefault(row['mode'], {}).setdefault(side, []).extend(row['repeats_s_per_image'])
    return {mode: {side: {'median': statistics.median(v), 'min': min(v), 'max': max(v), 'repeats': len(v)}
                   for side, v in sides.items()} for mode, sides in table.items()}


def main(args):
    bench = [a for a in args.bench_args if a != '--']
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    sides = {'before': os.path.abspath(args.before), 'after': os.path.abspath(args.after)}
    for side, folder in sides.items():
        if not os.path.isfile(os.path.join(folder, 'bench', 'bench_ttt.py')):
            raise UserError(f"--{side} {folder} holds no bench/bench_ttt.py")
    result = {'what': 'bench/bench_ttt.py of each checkout on its own code, alternated in one session',
              'command': ' '.join(sys.argv), 'bench_args': bench,
              'commits': {side: commit(folder) for side, folder in sides.items()},
              'runs': {'before': [], 'after': []}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, folder in sides.items():
                out = os.path.join(tmp, f'{side}-{r}.json')
                print(f"round {r + 1}/{args.rounds}: {side}", flush=True)
                subprocess.run([sys.executable, 'bench/bench_ttt.py', *bench, '--json', out], cwd=folder, check=True,
                               stdout=subprocess.DEVNULL)
                with open(out) as f:
                    result['runs'][side].append(json.load(f))
                result['summary'] = summary(result['runs'])
                if args.json:
                    write_json(args.json, result)
    first = result['runs']['after'][0]
    result.update(device=first['device'], torch=first['torch'], threads=first['threads'])
    if args.json:
        write_json(args.json, result)
    print(f"{result['device']}, torch {result['torch']}")
    print_table(['mode', 'before median (min-max)', 'after median (min-max)', 'repeats each', 'after / before'],
                [[mode, f"{s['before']['median']:.3f} ({s['before']['min']:.3f}-{s['before']['max']:.3f})",
                  f"{s['after']['median']:.3f} ({s['after']['min']:.3f}-{s['after']['max']:.3f})",
                  str(s['after']['repeats']), f"{s['after']['median'] / s['before']['median']:.3f}"]
                 for mode, s in result['summary'].items()])


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
