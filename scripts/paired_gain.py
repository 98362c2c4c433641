"""Paired gain of TTT-MAE over the baseline, per corruption, with its standard error.

Reads the folders scripts/collect_results.py reads: ROOT/<corruption>/per_image.npz (TTT) and
ROOT/<corruption>/baseline/per_image.npz. Images are paired by index (and checked by file name and
label): per image, d = correct after `--step` TTT steps - correct without adaptation, in {-1, 0, 1}.
The gain is mean(d) in points and its standard error std(d, ddof=1) / sqrt(n). The mean row pairs
images by file name across corruptions (same clean image), averages d per image over the corruptions
and takes the standard error over images, so it is only given when every corruption holds the same
images. Also shown: the mean gain at every step (how a step is chosen on a validation split) and, per
corruption, the share of the most predicted class before and after TTT: near 100% means the model
answers one class for nearly every image, and a gain from there is a reshuffling of that guess.
When every corruption also holds a finished online run (ROOT/<corruption>/online/, main_online_ttt.py),
its step (--online_step, default its last) and paired gain are shown beside the episodic ones.
Other runs than a sweep's (e.g. online streams, each ROOT/<name>/ with its baseline/ inside) are read
with --columns NAME..., their method named with --method, and --no_mean leaves out the mean row.
Prints a Markdown table and writes PREFIX.md and PREFIX.json.
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from util.cli import UserError, run_main  # noqa: E402
from util.io import write_json, write_text  # noqa: E402
from util.paired import mean_over_sets, mean_se, paired_differences  # noqa: E402
from util.records import is_finished, load_per_image  # noqa: E402
from util.sweeps import find_columns  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help="the sweep's output root (ROOT/<corruption>/[baseline/])")
    parser.add_argument('--step', default=None, type=int, help='TTT step compared (default: the last one)')
    parser.add_argument('--online_step', default=None, type=int,
                        help='step of the online runs compared (default: their last one)')
    parser.add_argument('--out', default=None, help='output prefix (default: ROOT/paired_gain)')
    parser.add_argument('--columns', nargs='+', default=None,
                        help="the run folders ROOT/<name>/, in this order (default: ROOT's corruption folders)")
    parser.add_argument('--method', default='TTT-MAE', help="the runs' name in the table")
    parser.add_argument('--no_mean', action='store_true', help='no mean row (runs over unrelated images)')
    return parser


def top_class_share(pred):
    return 100 * np.bincount(pred).max() / len(pred)


def compare(folder, base_folder, step):
    """Per-corruption numbers and the per-image differences keyed by file name."""
    ttt, base = load_per_image(folder), load_per_image(base_folder)
    s = ttt['pred'].shape[1] - 1 if step is None else step
    d, names = paired_differences(ttt, base, s, folder)
    correct = (ttt['pred'] == ttt['label'][:, None]).astype(np.int64)  # (images, steps + 1)
    before = (base['pred'][:, 0] == base['label']).astype(np.int64)
    after, step0 = correct[:, s], correct[:, 0]
    gain, se = mean_se(d)
    row = {'num_images': int(len(d)), 'step': int(s), 'baseline': 100 * before.mean(),
           'ttt': 100 * after.mean(), 'ttt_step0': 100 * step0.mean(), 'gain': gain, 'gain_se': se,
           'fixed': int((d > 0).sum()), 'broken': int((d < 0).sum()),
           'gain_per_step': (100 * (correct.mean(axis=0) - before.mean())).tolist(),
           'top_class_share': [top_class_share(base['pred'][:, 0]), top_class_share(ttt['pred'][:, s])]}
    return row, d, names


def method_summary(columns, sub, step):
    """Rows per column and the mean row of the runs in each column's folder <sub> ('': the column's own)."""
    rows, diffs = {}, []
    for c in columns:
        if 'baseline' not in c.fixed:
            raise UserError(f"{c.folder} has no baseline/ run to pair with")
        rows[c.name], d, names = compare(c.adapting.get(sub, os.path.join(c.folder, sub)), c.fixed['baseline'], step)
        diffs.append((d, names))
    steps = {r['step'] for r in rows.values()}
    if len(steps) != 1:
        raise UserError(f"the runs end at different steps {sorted(steps)}: pass --step")
    mean = {'baseline': float(np.mean([r['baseline'] for r in rows.values()])),
            'ttt': float(np.mean([r['ttt'] for r in rows.values()])), 'step': steps.pop(),
            'num_corruptions': len(columns)}
    if len({len(r['gain_per_step']) for r in rows.values()}) == 1:
        mean['gain_per_step'] = np.mean([r['gain_per_step'] for r in rows.values()], axis=0).tolist()
    gain, se, images, paired = mean_over_sets(diffs)
    if paired:  # the same images in every column: each image's gain averaged over them
        mean.update(gain=gain, gain_se=se, num_images=images)
    else:
        mean['gain'] = mean['ttt'] - mean['baseline']
        mean['gain_se'] = None  # images differ between columns: no pairing across them
    return rows, mean


def collect(root, step=None, online_step=None, columns=None, method='TTT-MAE'):
    found = find_columns(root, columns)
    summary = {'root': root, 'method': method, 'column': 'corruption' if all(c.corruption for c in found) else 'run'}
    rows, mean = method_summary(found, '', step)
    summary.update(columns=[c.name for c in found], rows=rows, mean=mean)
    if all('online' in c.adapting and is_finished(c.adapting['online']) for c in found):
        summary['online_rows'], summary['online_mean'] = method_summary(found, 'online', online_step)
    return summary


def markdown(summary, with_mean=True):
    step, online, method = summary['mean']['step'], 'online_rows' in summary, summary['method']
    extra = f" TTT-MAE online (step {summary['online_mean']['step']}) | online gain ± SE |" if online else ''
    lines = [f"| {summary['column']} | images | no adaptation | {method} (step {step}) | paired gain ± SE |{extra} "
             'fixed / broken | top class share |', '|---|---:|---:|---:|---:|' + '---:|' * (2 + 2 * online)]

    def gain(r):
        return f"{r['gain']:+.1f}" + ('' if r['gain_se'] is None else f" ± {r['gain_se']:.1f}")
    for c in summary['columns']:
        r = summary['rows'][c]
        cells = [c, r['num_images'], f"{r['baseline']:.1f}", f"{r['ttt']:.1f}", gain(r)]
        if online:
            o = summary['online_rows'][c]
            cells += [f"{o['ttt']:.1f}", gain(o)]
        cells += [f"{r['fixed']} / {r['broken']}", f"{r['top_class_share'][0]:.0f} -> {r['top_class_share'][1]:.0f}"]
        lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
    m = summary['mean']
    cells = [f"mean of {m['num_corruptions']}", m.get('num_images', ''), f"{m['baseline']:.1f}", f"{m['ttt']:.1f}",
             gain(m)] + ([f"{summary['online_mean']['ttt']:.1f}", gain(summary['online_mean'])] if online else [])
    if with_mean:
        lines.append('| ' + ' | '.join(map(str, cells)) + ' | | |')
    notes = [f'Accuracy in %. Gain: per image, correct after {method} - correct before, averaged (points); '
             'SE = sample std / sqrt(n). fixed / broken: images TTT turned right / wrong. '
             'Top class share: % of images given the most predicted class, no adaptation -> TTT.']
    if with_mean and m['gain_se'] is not None:
        notes.append('Mean row: per-image gain averaged over the corruptions (same clean images), SE over images.')
    if with_mean and 'gain_per_step' in m:
        notes.append('Mean gain per step 1..: ' + ' '.join(f'{g:+.1f}' for g in m['gain_per_step'][1:]))
    if online:
        notes.append('Online: the weights carry over from image to image (main_online_ttt.py); '
                     'its step is the step within each image. Mean online gain per step 1..: '
                     + ' '.join(f'{g:+.1f}' for g in summary['online_mean'].get('gain_per_step', [0])[1:]))
    return '\n'.join(lines + [''] + notes) + '\n'


def main(args):
    summary = collect(args.root, args.step, args.online_step, args.columns, args.method)
    prefix = args.out or os.path.join(args.root, 'paired_gain')
    table = markdown(summary, not args.no_mean)
    print(table, end='')
    write_text(prefix + '.md', table)
    write_json(prefix + '.json', summary)
    print(f"\nwrote {prefix}.md, {prefix}.json")


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
