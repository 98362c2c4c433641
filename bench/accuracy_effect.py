"""Accuracy effect of a fast mode: per-step accuracy of runs against a reference run on the same images,
as paired differences with standard errors.

Each root is a sweep's results folder (ROOT/<corruption>/per_image.npz, as scripts/demo.sh and
scripts/sweep_imagenet_c.sh write them). Per image and step, d = correct in the run - correct in the
reference, in {-1, 0, 1}; d is averaged over the corruptions per clean image (the same images in every
corruption, paired by file name), and the mean and its standard error are taken over images.

  DEMO_RESULTS=demo_out/modes/default DEMO_TTT_COMPILE=0 DEMO_TTT_PARALLEL=1 DEMO_ONLINE=0 bash scripts/demo.sh
  python bench/accuracy_effect.py demo_out/modes/default compile+K4=demo_out/results_test bf16=demo_out/modes/bf16
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import print_table  # noqa: E402
from util.cli import UserError, run_main  # noqa: E402
from util.io import write_json  # noqa: E402
from util.records import load_per_image  # noqa: E402
from util.sweeps import find_columns  # noqa: E402


def correctness(root, corruption):
    """{file name: correct per step} of one run."""
    f = load_per_image(os.path.join(root, corruption))
    correct = f['pred'] == f['label'][:, None]
    return dict(zip(f['filename'].tolist(), correct.astype(np.int64)))


def compare(reference, run):
    """Per-step mean difference (points), its SE, the reference's accuracy, and how many image-steps differ."""
    columns = [c.name for c in find_columns(reference)]
    diffs, ref_correct, differing, total, first = [], [], 0, 0, None
    for c in columns:
        ref, other = correctness(reference, c), correctness(run, c)
        if set(ref) != set(other):
            raise UserError(f"{c}: {run} and {reference} hold different images")
        names = sorted(ref)
        first = first or (c, names)
        if names != first[1]:  # each clean image's difference is averaged over the corruptions
            raise UserError(f"{reference}: {c} and {first[0]} hold different images")
        r, o = np.stack([ref[n] for n in names]), np.stack([other[n] for n in names])
        if r.shape != o.shape:
            raise UserError(f"{c}: {run} has {o.shape[1] - 1} steps, {reference} {r.shape[1] - 1}")
        diffs.append(o - r)
        ref_correct.append(r)
        differing += int((o != r).sum())
        total += r.size
    per_image = np.mean(diffs, axis=0)  # (images, steps + 1): averaged over corruptions
    n = len(per_image)
    return {'corruptions': columns, 'num_images': n,
            'difference_per_step': (100 * per_image.mean(0)).tolist(),
            'se_per_step': (100 * per_image.std(0, ddof=1) / math.sqrt(n)).tolist(),
            'reference_accuracy_per_step': (100 * np.mean(ref_correct, axis=(0, 1))).tolist(),
            'image_steps_differing': differing, 'image_steps': total}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('reference', help='results root of the reference mode (the default loop)')
    parser.add_argument('runs', nargs='+', help='NAME=ROOT of each mode compared with it')
    parser.add_argument('--steps', nargs='+', type=int, default=[0, 1, 2, 5, 10, 20], help='steps shown')
    parser.add_argument('--json', default=None, help='also write every step here')
    return parser


def main(args):
    results, rows = {}, []
    for spec in args.runs:
        name, sep, root = spec.partition('=')
        if not sep:
            raise UserError(f"expected NAME=ROOT, got {spec!r}")
        r = results[name] = compare(args.reference, root)
        shown = [s for s in args.steps if s < len(r['difference_per_step'])]
        rows.append([name, r['num_images'], f"{r['image_steps_differing']}/{r['image_steps']}"]
                    + [f"{r['difference_per_step'][s]:+.2f} ± {r['se_per_step'][s]:.2f}" for s in shown])
    ref = next(iter(results.values()))
    print(f"reference {args.reference}: accuracy per step (mean of {len(ref['corruptions'])} corruptions) "
          + ' '.join(f"{a:.1f}" for a in ref['reference_accuracy_per_step']))
    print_table(['mode', 'images', 'image-steps differing'] + [f'step {s}' for s in shown], rows)
    if args.json:
        write_json(args.json, {'reference': args.reference, 'runs': results})


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
