"""Pick the images a figure shows by a rule, not by eye: from a finished TTT-MAE run, the first image in
file order that TTT turns right at --step (wrong before adaptation, right after) and the first it turns
wrong. Writes them, one path relative to the run's --data_path per line, as a --subset_file for a rerun
with --save_reconstructions (the same seed gives each image the same masks and steps):

  python scripts/pick_examples.py results/fog --step 20 --out results/fog_examples.txt
  python main_test_time_training.py ... --subset_file results/fog_examples.txt --save_reconstructions 2

A kind that the run has none of is left out (and said); with neither, the first image is written.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from util.cli import POSITIVE_INT, ArgumentParser, UserError, run_main  # noqa: E402
from util.io import write_text  # noqa: E402
from util.records import load_per_image  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(__doc__, prog='scripts/pick_examples.py')
    parser.add_argument('run', help="a TTT-MAE run's output folder (its per_image.npz)")
    parser.add_argument('--step', default=None, type=POSITIVE_INT, help='the step compared with step 0 (None: the last)')
    parser.add_argument('--out', required=True, help='the list written')
    return parser


def pick(records, step):
    """[(kind, position)] of the first image turned right and the first turned wrong, in file order."""
    last = records['pred'].shape[1] - 1
    step = last if step is None else step
    if last == 0:
        raise UserError("the run took no steps: there is nothing TTT turned right or wrong")
    if not 0 < step <= last:
        raise UserError(f"--step {step}: the run has steps 1..{last}")
    order = np.argsort(records['index'])  # file order
    correct = records['pred'][order] == records['label'][order, None]
    picked = []
    for kind, turned in (('turned right', ~correct[:, 0] & correct[:, step]),
                         ('turned wrong', correct[:, 0] & ~correct[:, step])):
        found = np.flatnonzero(turned)
        if len(found):
            picked.append((kind, int(order[found[0]])))
        else:
            print(f"no image is {kind} at step {step}")
    return picked or [('the first image', int(order[0]))]


def main(args):
    records = load_per_image(args.run)
    picked = pick(records, args.step)
    names = [str(records['filename'][i]) for _, i in picked]
    write_text(args.out, ''.join(f'{n}\n' for n in names))
    for (kind, _), name in zip(picked, names):
        print(f"{kind}: {name}")
    print(f"wrote {args.out}")


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
