"""Seconds per image and peak memory of each rule for which parameters adapt (--finetune_mode), against
`encoder` (the paper's), on the same model, images and settings: one process per rule
(bench/bench_ttt.py --finetune_mode RULE), so that each rule's peak memory is its own (on a CPU the
process's peak resident memory, on a GPU the peak held by tensors). Prints a table and writes JSON.

  python bench/bench_rules.py --model mae_vit_tiny_patch4 --image_size 32 --batch_size 16 --steps 20 \\
      --json bench/results/cpu-2core-rules.json
"""
import argparse
import json
import os
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
    parser.add_argument('--rules', nargs='+', default=['encoder', 'all', 'norm', 'bias', 'last:1', 'last:2', 'lora:4'],
                        help='rules timed, each in a process of its own (encoder is always among them)')
    parser.add_argument('--mode', default='default', help="bench_ttt.py's mode, e.g. default or compile+K4")
    for flag, default in (('--model', 'mae_vit_tiny_patch4'), ('--image_size', '32'), ('--batch_size', '16'),
                          ('--steps', '20'), ('--images', '16'), ('--repeats', '3')):
        parser.add_argument(flag, default=default, help=f'passed to bench/bench_ttt.py (default {default})')
    parser.add_argument('--device', default=None, help='passed to bench/bench_ttt.py (default: its own)')
    parser.add_argument('--json', default=None, help='also write the table here as JSON, after every rule')
    return parser


def main(bench):
    rules = ['encoder'] + [r for r in bench.rules if r != 'encoder']
    result = {'mode': bench.mode, 'model': bench.model, 'batch_size': int(bench.batch_size), 'steps': int(bench.steps),
              'command': ' '.join(sys.argv), 'rows': []}
    with tempfile.TemporaryDirectory() as folder:
        for rule in rules:
            out = os.path.join(folder, 'rule.json')
            command = [sys.executable, os.path.join(REPO, 'bench', 'bench_ttt.py'), '--modes', bench.mode,
                       '--finetune_mode', rule, '--json', out, *sum(([f'--{k}', str(getattr(bench, k))] for k in (
                           'model', 'image_size', 'batch_size', 'steps', 'images', 'repeats')), [])]
            if bench.device:
                command += ['--device', bench.device]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                raise UserError(f"bench_ttt.py failed for --finetune_mode {rule}: {done.stderr.strip().splitlines()[-1]}")
            with open(out) as f:
                run = json.load(f)
            row, = run['rows']
            result.update(device=run['device'], torch=run['torch'], threads=run['threads'])
            result['rows'].append({'rule': rule, 's_per_image': row['s_per_image'],
                                   'repeats_s_per_image': row['repeats_s_per_image'],
                                   'peak_memory_gib': row['peak_memory_gib'], 'warmup_s': row['warmup_s']})
            print(f"{rule}: {row['s_per_image']:.3f} s/image, peak memory {row['peak_memory_gib']:.2f} GiB", flush=True)
            base = result['rows'][0]
            for r in result['rows']:
                r['time_vs_encoder'] = r['s_per_image'] / base['s_per_image']
                r['memory_vs_encoder'] = r['peak_memory_gib'] / base['peak_memory_gib']
            if bench.json:
                write_json(bench.json, result)
    print(f"{result['device']}, torch {result['torch']}, {bench.model}, mode {bench.mode}")
    print_table(['rule', 's/image', 'vs encoder', 'peak memory (GiB)', 'vs encoder'],
                [[r['rule'], f"{r['s_per_image']:.3f}", f"{r['time_vs_encoder']:.2f}x", f"{r['peak_memory_gib']:.2f}",
                  f"{r['memory_vs_encoder']:.2f}x"] for r in result['rows']])


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
