"""How many steps each image needs: stopping rules scored on finished TTT-MAE runs, without rerunning.

Each rule (util/stop_rules.py, the same function main_test_time_training.py --stop_rule applies live)
reads an image's label-free records step by step (its predictions, top-1 probabilities and the objective
of each step: TTT-MAE's reconstruction loss) and stops it at the first step where it fires; the image's answer is then its prediction at that
step. For each rule and parameter: the accuracy, the mean number of steps used (the cost, also as a
fraction of the run's steps), and the paired gain over no adaptation (step 0) and over the run's last
step, each ± its standard error over images (sample std / sqrt(n)). The oracle stops each image at its
first correct step: it reads the labels, so it is only an upper bound, and marked so.

  python scripts/score_stop_rules.py demo_out/results_test/gaussian_noise demo_out/results_test/fog
  python scripts/score_stop_rules.py RUN ... --choose_on VAL_RUN ...   # each family's parameter chosen there

With --choose_on, each family's parameter is the one with the best accuracy on those runs (the fewer
steps on a tie), and the table reports it on the runs given first, so that the choice is not made on
the images it is reported on. Writes PREFIX.md, PREFIX.json and PREFIX.png (accuracy against mean steps
used, a curve per family, the fixed number of steps as the reference).
"""
import argparse
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from util.cli import UserError, run_main  # noqa: E402
from util.compat import recorded_objective  # noqa: E402
from util.io import save_png, write_json, write_text  # noqa: E402
from util.records import load_per_image  # noqa: E402
from util.stop_rules import RULES, parse, stop_step  # noqa: E402

GRID = {'stable': [1, 2, 3, 4, 5, 7, 10], 'plateau': [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        'confident': [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='finished TTT-MAE run folders (each with per_image.npz)')
    parser.add_argument('--choose_on', nargs='+', default=None, help="runs on which each family's parameter is chosen")
    parser.add_argument('--rules', nargs='+', default=None, metavar='NAME:PARAM',
                        help='score these rules only (default: every family over its grid, and every fixed step)')
    parser.add_argument('--out', default=None, help='output prefix (default: step_rules beside the first run)')
    return parser


def load_runs(folders):
    """The runs' per-step records, pooled over images: preds, top-1 probabilities, objectives, labels (steps + 1
    columns; objectives steps)."""
    parts = []
    for folder in folders:
        r = load_per_image(folder)
        if 'top1_prob' not in r:
            raise UserError(f"{folder} records no per-step top-1 probabilities (a run of an older version): rerun it "
                            f"into a new folder to score stopping rules on it")
        if 'stop_step' in r:
            raise UserError(f"{folder} was stopped early by --stop_rule: score rules on a run of fixed steps")
        parts.append(r)
    counts = {p['pred'].shape[1] - 1 for p in parts}
    if len(counts) > 1:
        raise UserError(f"the runs have different numbers of steps ({sorted(counts)}): score them separately")
    return {'pred': np.concatenate([p['pred'] for p in parts]), 'label': np.concatenate([p['label'] for p in parts]),
            'top1_prob': np.concatenate([p['top1_prob'] for p in parts]),
            'objective': np.concatenate([recorded_objective(p, folder) for p, folder in zip(parts, folders)])}


def mean_se(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float('nan')


def score(runs, stops, rule):
    """One rule's row from each image's stop step."""
    images = np.arange(len(stops))
    correct = runs['pred'][images, stops] == runs['label']
    before, last = runs['pred'][:, 0] == runs['label'], runs['pred'][:, -1] == runs['label']
    steps = runs['pred'].shape[1] - 1
    gain_0, se_0 = mean_se(100 * (correct.astype(int) - before))
    gain_last, se_last = mean_se(100 * (correct.astype(int) - last))
    return {'rule': rule, 'accuracy': 100 * float(correct.mean()), 'mean_steps': float(stops.mean()),
            'cost': float(stops.mean()) / steps if steps else 0., 'gain_vs_none': gain_0, 'gain_vs_none_se': se_0,
            'gain_vs_last': gain_last, 'gain_vs_last_se': se_last, 'uses_labels': rule == 'oracle'}


def stops_of(runs, rule):
    if rule == 'oracle':  # the first correct step, else the last: reads the labels
        correct = runs['pred'] == runs['label'][:, None]
        return np.where(correct.any(1), correct.argmax(1), correct.shape[1] - 1)
    name, param = parse(rule)
    return np.array([stop_step(name, param, p, q, l)
                     for p, q, l in zip(runs['pred'], runs['top1_prob'], runs['objective'])])


def candidate_rules(steps):
    rules = [f'fixed:{k}' for k in range(steps + 1)]
    rules += [f'{name}:{v}' for name, grid in GRID.items() for v in grid if name != 'stable' or v <= steps]
    return rules


def family(rule):
    return rule.split(':')[0]


def choose(rows):
    """Per family, the best accuracy (fewer steps on a tie) among rows."""
    best = {}
    for r in rows:
        f = family(r['rule'])
        if f != 'oracle' and (f not in best or (r['accuracy'], -r['mean_steps']) > (best[f]['accuracy'], -best[f]['mean_steps'])):
            best[f] = r
    return best


def collect(folders, choose_on=None, rules=None):
    runs = load_runs(folders)
    steps = runs['pred'].shape[1] - 1
    for rule in rules or []:
        parse(rule)
    grid = (rules or candidate_rules(steps)) + ['oracle']
    rows = [score(runs, stops_of(runs, rule), rule) for rule in grid]
    summary = {'runs': [os.path.abspath(f) for f in folders], 'images': int(len(runs['label'])), 'steps': steps,
               'rows': rows, 'chosen': None}
    if choose_on:
        val = load_runs(choose_on)
        if val['pred'].shape[1] - 1 != steps:
            raise UserError(f"--choose_on runs have {val['pred'].shape[1] - 1} steps, the runs {steps}")
        val_rows = [score(val, stops_of(val, rule), rule) for rule in grid if rule != 'oracle']
        picked = choose(val_rows)
        summary['chosen'] = {'on': [os.path.abspath(f) for f in choose_on], 'images': int(len(val['label'])),
                             'rules': {f: r['rule'] for f, r in picked.items()},
                             'rows': [next(r for r in rows if r['rule'] == picked[f]['rule']) for f in picked]}
    return summary


def fmt_row(r):
    mark = ' (uses the labels: an upper bound)' if r['uses_labels'] else ''
    return (f"| {r['rule']}{mark} | {r['accuracy']:.1f} | {r['mean_steps']:.2f} ({100 * r['cost']:.0f}%) | "
            f"{r['gain_vs_none']:+.1f} ± {r['gain_vs_none_se']:.1f} | {r['gain_vs_last']:+.1f} ± {r['gain_vs_last_se']:.1f} |")


def markdown(summary):
    head = ['| rule | accuracy (%) | mean steps (of the run\'s) | gain over no adaptation | gain over the last step |',
            '|---|---:|---:|---:|---:|']
    lines = [f"{summary['images']} images of {len(summary['runs'])} runs, {summary['steps']} steps each.", '']
    if summary['chosen']:
        lines += [f"Each family's parameter chosen on {summary['chosen']['images']} images of "
                  f"{len(summary['chosen']['on'])} other runs, reported here:", ''] + head
        lines += [fmt_row(r) for r in summary['chosen']['rows']]
        lines += ['', 'Every rule scored:', '']
    lines += head + [fmt_row(r) for r in summary['rows']]
    lines += ['', 'Gains in points, per image (correct with the rule - correct without it), ± their standard error.']
    return '\n'.join(lines) + '\n'


def plot(summary, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in RULES:
        rows = sorted((r for r in summary['rows'] if family(r['rule']) == name), key=lambda r: r['mean_steps'])
        if rows:
            ax.plot([r['mean_steps'] for r in rows], [r['accuracy'] for r in rows], marker='o', ms=3,
                    lw=2 if name == 'fixed' else 1, color='black' if name == 'fixed' else None,
                    label=name + (' (reference)' if name == 'fixed' else ''))
    oracle = next(r for r in summary['rows'] if r['rule'] == 'oracle')
    ax.plot([oracle['mean_steps']], [oracle['accuracy']], marker='*', ms=10, ls='none', color='grey',
            label='oracle (uses the labels)')
    for r in (summary['chosen'] or {}).get('rows', []):
        ax.plot([r['mean_steps']], [r['accuracy']], marker='s', mfc='none', ms=9, ls='none', color='red')
    ax.set_xlabel('mean steps used per image')
    ax.set_ylabel('accuracy (%)')
    ax.set_title(f"stopping rules, {summary['images']} images" + (' (squares: chosen on other runs)'
                                                                   if summary['chosen'] else ''), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, 110)


def main(args):
    summary = collect(args.runs, args.choose_on, args.rules)
    prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), 'step_rules')
    table = markdown(summary)
    print(table, end='')
    write_text(prefix + '.md', table)
    write_json(prefix + '.json', summary)
    plot(summary, prefix + '.png')
    print(f"\nwrote {prefix}.md, {prefix}.json, {prefix}.png")


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
