"""Collect an ImageNet-C sweep into the paper's table: accuracy (or error) without adaptation and after TTT-MAE.

Layout (the released README's): ROOT/<corruption>/ holds the test-time training run and
ROOT/<corruption>/baseline/ the baseline (any other ROOT/<name>/ holding a run is a column too: a test
set of one's own); each holds our results.json or only the released accuracy.txt
(results.json wins when both exist; a released accuracy.txt does not say whether the run finished, so
it counts as complete and is marked with a dagger; ours ends with "partial: N of M images" while the
run is unfinished).

Prints a Markdown table and writes PREFIX.csv, PREFIX.json and PREFIX.png (accuracy or error vs TTT step).
It says which images each number comes from (all of a folder, --max_examples of them, or a --subset_file's list).
The mean is over the 15 standard corruptions present (not the 4 extra ones or other folders; over every
column where there is no standard corruption) and is "n/a" when any of them is missing or partial: nothing is averaged silently (--allow_partial averages partial runs, flagged).
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from util.cli import UserError, run_main  # noqa: E402
from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS  # noqa: E402
from util.io import save_png, write_json, write_text  # noqa: E402
from util.paired import mean_over_sets, paired_differences  # noqa: E402
from util.records import is_finished, load_per_image  # noqa: E402
from util.sweeps import FIXED, find_columns  # noqa: E402


# runs without adaptation, ROOT/<corruption>/<folder>/: the probe's (the paper's ViT Probe row), MAE's fine-tuned
# ViT (Fine-Tune) and a jointly trained model (Joint Train), each a test_without_adaptation.py run
FIXED_MODELS = {'baseline': 'no adaptation', 'finetuned': 'fine-tune (MAE)', 'joint': 'joint train'}
assert tuple(FIXED_MODELS) == FIXED
REFERENCES = os.path.join(REPO_ROOT, 'docs', 'results', 'references')


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('roots', nargs='+', metavar='ROOT',
                        help="a sweep's output root (ROOT/<corruption>/[baseline/]); several: their mean accuracy "
                             "per TTT step side by side (ablations)")
    parser.add_argument('--labels', nargs='+', default=None, help="the roots' names in the comparison (default: "
                                                                   "their folder names)")
    parser.add_argument('--reference', default=None,
                        help=f"rows to compare with, under the table: a name ({', '.join(known_references())}; "
                             f"docs/results/references/) or a JSON file of that format")
    parser.add_argument('--step', default=None, type=int,
                        help="TTT step to tabulate (default: the last one; a method whose runs end before it: their last)")
    parser.add_argument('--out', default=None, help='output prefix (default: ROOT/summary)')
    parser.add_argument('--title', default=None, help="the figure's title (default: 'ImageNet-C: <ROOT folder name>')")
    parser.add_argument('--allow_partial', action='store_true',
                        help='average partial runs too (the mean is then flagged)')
    parser.add_argument('--columns', nargs='+', default=None, metavar='NAME',
                        help="only these columns (run folders under ROOT, e.g. fog or fog/5), in this order")
    parser.add_argument('--metric', default='accuracy', choices=['accuracy', 'error'],
                        help='top-1 accuracy, or error = 100 - accuracy as test-time-adaptation benchmarks report')
    return parser


def read_run(folder, method):
    """A run's {'curve': {step: accuracy}, 'complete', 'num_images', 'num_images_expected', 'source', 'args', ...},
    or None. method: what the folder must hold ('ttt', 'baseline'), or None for either."""
    json_path, txt_path = os.path.join(folder, 'results.json'), os.path.join(folder, 'accuracy.txt')
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                r = json.load(f)
            if method and r.get('method', method) != method:
                raise ValueError(f"method is {r['method']!r}, expected {method!r} in this folder")
            curve = {step: float(acc) for step, acc in enumerate(r['accuracy_per_step'])}
            if not curve:
                raise ValueError('accuracy_per_step is empty')
            return {'curve': curve, 'complete': bool(r['complete']), 'num_images': r.get('num_images'),
                    'num_images_expected': r.get('num_images_expected'), 'source': 'results.json',
                    'selection': r.get('selection'), 'device_seconds': r.get('device_seconds'),
                    'device': r.get('device'), 'args': r.get('args') or {}, 'online': bool(r.get('online')),
                    'folder': folder, 'method': r.get('method', method)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {json_path}: {type(e).__name__}: {e}") from None
    if os.path.exists(txt_path):
        try:
            with open(txt_path) as f:
                lines = [line.split() for line in f.read().splitlines()[1:] if line.strip()]  # line 1: the run's args
            counts = [None, None]
            if lines and lines[-1][0] == 'partial:':  # an unfinished run of ours
                match = re.fullmatch(r'partial: (\d+) of (\d+) images', ' '.join(lines.pop()))
                if not match:
                    raise ValueError('a last line "partial: N of M images" was expected')
                counts = [int(n) for n in match.groups()]
            if method == 'baseline':  # one line "{acc} {loss}"
                if len(lines) != 1:
                    raise ValueError(f'expected one "accuracy loss" line after the args line, found {len(lines)}')
                curve = {0: float(lines[0][0])}
            else:  # released numbering: line "{i}\t{acc}" is the accuracy after i + 1 steps
                curve = {int(i) + 1: float(acc) for i, acc in lines}
                if not curve:
                    raise ValueError('no "step<TAB>accuracy" lines after the args line')
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {txt_path}: {e}") from None
        return {'curve': curve, 'complete': counts[0] is None, 'num_images': counts[0],
                'num_images_expected': counts[1], 'source': 'accuracy.txt', 'selection': None,
                'device_seconds': None, 'device': None, 'args': {}, 'online': False, 'folder': folder,
                'method': method}
    return None


def cell(run, step):
    """One table entry: the value at `step` with its status (complete, partial, missing, no step)."""
    if run is None:
        return {'value': None, 'status': 'missing'}
    c = {'value': run['curve'].get(step), 'num_images': run['num_images'], 'selection': run['selection'],
         'num_images_expected': run['num_images_expected'], 'source': run['source']}
    if c['value'] is None:
        c['status'] = f'no step {step}'
    else:
        c['status'] = 'complete' if run['complete'] else 'partial'
    return c


def mean_cell(cells, allow_partial):
    statuses = {c['status'] for c in cells}
    if not cells or not statuses <= {'complete', 'partial'} or ('partial' in statuses and not allow_partial):
        return {'value': None, 'status': 'n/a'}
    return {'value': sum(c['value'] for c in cells) / len(cells),
            'status': 'partial' if 'partial' in statuses else 'complete'}


def selection_text(selection):
    if selection is None:
        return 'not recorded (a released accuracy.txt, or a results.json of an older version)'
    if selection.get('subset_file'):
        return (f"the {selection['images']} images listed in {selection['subset_file']} "
                f"(sha256 {selection['subset_file_sha256'][:12]})")
    if selection.get('max_examples'):
        return f"{selection['images']} images (--max_examples, --subset {selection['subset']})"
    return f"all {selection['images']} images of the folder"


OBJECTIVE_NAMES = {'mae': 'TTT-MAE', 'memo': 'MEMO', 'entropy': 'entropy'}
DEFAULT_RULES = {'mae': 'encoder', 'memo': 'reached', 'entropy': 'norm'}  # each objective's own, left out of its name


def method_label(run):
    """The row an adapting run goes to, from its recorded arguments: its objective, its --finetune_mode where
    not the objective's own, online or not. TTT-MAE as the paper runs it (and a released run) is 'TTT-MAE'."""
    args = run['args']
    objective = args.get('objective') or 'mae'
    online = run['online'] or 'online_window' in args
    own_rule = 'all' if online and objective == 'mae' else DEFAULT_RULES.get(objective)  # main_online_ttt.py's
    rule = args.get('finetune_mode') or own_rule
    return ('online ' if online else '') + OBJECTIVE_NAMES.get(objective, objective) + \
        ('' if rule == own_rule else f' ({rule})')


def adapting_rows(columns):
    """{row: (label, {column: run})} of the runs other than the fixed ones. Row 'ttt' is the sweep's own, the
    runs in the column folders themselves (the released layout's TTT-MAE runs); the runs in folders below
    them (fog/memo/, fog/online/) make a row per method (method_label), or per method and folder where a
    method lies in folders of several names (fog/memo/, fog/memo_lr1e-3/); a run without adaptation there
    (fog/vit_b/) a row by its folder."""
    found = [(c, key, read_run(folder, None if key else 'ttt')) for c in columns for key, folder in c.adapting.items()]
    labels = {(c.name, key): method_label(run) if run['method'] == 'ttt' else key for c, key, run in found}
    keys = {}
    for (_, key), label in labels.items():
        keys.setdefault(label, set()).add(key)
    rows = {}
    for c, key, run in found:
        label = labels[c.name, key] if key == '' or len(keys[labels[c.name, key]]) == 1 else \
            f'{labels[c.name, key]} [{key}]'
        rows.setdefault('ttt' if key == '' else label, (label, {}))[1][c.name] = run
    return dict(sorted(rows.items(), key=lambda item: (item[0] != 'ttt', item[0])))


def mean_curve(runs, mean_over):
    """The mean accuracy per step over the complete runs of mean_over that share the most common step list."""
    groups = {}
    for c in mean_over:
        if runs.get(c) and runs[c]['complete']:
            groups.setdefault(tuple(sorted(runs[c]['curve'])), []).append(c)
    if not groups:
        return None
    steps, members = max(groups.items(), key=lambda g: (len(g[1]), len(g[0])))
    return {'steps': list(steps), 'corruptions': members,
            'value': [sum(runs[c]['curve'][k] for c in members) / len(members) for k in steps]}


def collect(root, step=None, allow_partial=False, metric='accuracy', only=None):
    """Everything the outputs show, as one JSON-ready dict."""
    found = find_columns(root, only)
    columns = [c.name for c in found]
    fixed = {sub: {c.name: read_run(c.fixed[sub], 'baseline') if sub in c.fixed else None for c in found}
             for sub in FIXED_MODELS}
    adapting = adapting_rows(found)
    ttt = adapting.get('ttt', (None, {}))[1]
    baseline = fixed['baseline']
    for _, runs in adapting.values():  # a released accuracy.txt has no step 0: it is the baseline's accuracy
        for c, run in runs.items():
            if 0 not in run['curve'] and baseline[c] and baseline[c]['complete']:
                run['curve'][0] = baseline[c]['curve'][0]
    if metric == 'error':
        for runs in [*(runs for _, runs in adapting.values()), *fixed.values()]:
            for run in runs.values():
                if run:
                    run['curve'] = {k: 100 - v for k, v in run['curve'].items()}
    last_steps = sorted({max(r['curve']) for _, runs in adapting.values() for r in runs.values()})
    if step is not None and not any(step in r['curve'] for _, runs in adapting.values() for r in runs.values()):
        raise UserError(f"no TTT run has step {step} (last steps found: {last_steps})")

    # the ImageNet-C mean is over its 15 standard corruptions; folders of one's own are averaged only alone
    corruption = {c.name: c.corruption for c in found}
    standard = [c for c in columns if corruption[c] in CORRUPTIONS]
    mean_over = standard or columns
    rows = []
    present = [(sub, FIXED_MODELS[sub], runs, 0) for sub, runs in fixed.items()
               if sub == 'baseline' or any(runs.values())]
    for row, (label, runs) in adapting.items():  # --step, or each row's last where its runs end before it
        last = max(max(r['curve']) for r in runs.values())
        s = last if step is None or last < step else step
        present.append((row, f'{label} (step {s})', runs, s))
    for method, label, runs, s in present:
        cells = {c: cell(runs.get(c), s) for c in columns}
        rows.append({'method': method, 'label': label, 'step': s, 'cells': cells,
                     'mean': mean_cell([cells[c] for c in mean_over], allow_partial)})
    curves = {c: {'steps': sorted(r['curve']), 'value': [r['curve'][k] for k in sorted(r['curve'])],
                  'complete': r['complete']} for c, r in ttt.items()}
    selections = {}  # which images the numbers come from: corruption folders that share one
    for c in columns:
        for method, run in [(row, runs.get(c)) for row, (_, runs) in adapting.items()] + \
                [(sub, runs[c]) for sub, runs in fixed.items()]:
            if run:
                selections.setdefault(selection_text(run['selection']), []).append(f"{c} ({method})")
    ttt_row = next((r for r in rows if r['method'] == 'ttt'), None)
    runs_by_row = {**fixed, **{row: runs for row, (_, runs) in adapting.items()}}
    return {'root': root, 'step': ttt_row['step'] if ttt_row else step, 'metric': metric, 'columns': columns,
            'corruptions': corruption, 'mean_over': mean_over, 'selections': selections,
            'cost': cost(runs_by_row),
            'methods': compare_methods(rows, runs_by_row, found, mean_over, metric),
            'not_run': [k for k in CORRUPTIONS if k not in {corruption[c] for c in standard}] if standard else [],
            'allow_partial': allow_partial,
            'rows': rows, 'curves': curves, 'mean_curve': mean_curve(ttt, mean_over)}


def cost(runs):
    """The device-hours of the runs read (from results.json's device_seconds: every process, resumed parts
    included), per row, the devices they ran on, and how many runs recorded none."""
    recorded = [(method, r) for method, by_column in runs.items() for r in by_column.values() if r]
    hours = {method: sum(r['device_seconds'] for m, r in recorded if m == method and r['device_seconds'] is not None)
             / 3600 for method in runs}
    return {'device_hours': hours, 'total_device_hours': sum(hours.values()),
            'methods_run': sorted({method for method, _ in recorded}),
            'devices': sorted({r['device'] for _, r in recorded if r['device']}),
            'runs_without_record': sum(r['device_seconds'] is None for _, r in recorded)}


def compare_methods(rows, runs_by_row, columns, mean_over, metric):
    """Every row as a method at its cost: its mean over mean_over, its paired gain over no adaptation with its
    standard error (from per_image.npz, over the columns where both runs are finished; points of accuracy
    whatever the metric), and its device-seconds per image (device_seconds / images over its runs). A row
    whose runs have several steps (TTT-MAE) also gets its mean per step, each step's cost estimated as that
    share of the run's (the steps dominate it); so does a row tabulated before its runs' last step
    (cost_estimated)."""
    folders = {c.name: c for c in columns}
    methods = []
    for row in rows:
        runs = {c: r for c, r in runs_by_row[row['method']].items() if r and c in mean_over}
        timed = [r for r in runs.values() if r['device_seconds'] is not None and r['num_images']]
        seconds = sum(r['device_seconds'] for r in timed) / sum(r['num_images'] for r in timed) if timed else None
        diffs = []
        for c, run in runs.items():  # each column where the run and the baseline are finished on the same images
            base = folders[c].fixed.get('baseline')
            if row['method'] != 'baseline' and row['step'] in run['curve'] and base and is_finished(run['folder']) \
                    and is_finished(base):
                records, base_records = load_per_image(run['folder']), load_per_image(base)
                if np.array_equal(records['index'], base_records['index']):
                    diffs.append(paired_differences(records, base_records, row['step'], run['folder']))
        gain = dict(zip(('gain', 'gain_se', 'gain_images', 'gain_paired'), mean_over_sets(diffs))) if diffs else {}
        curve = mean_curve(runs, mean_over) if row['step'] else None
        if curve and seconds is not None:
            curve['device_seconds_per_image'] = [seconds * k / curve['steps'][-1] for k in curve['steps']]
        last = max((max(r['curve']) for r in runs.values()), default=0)
        methods.append({'method': row['method'], 'label': row['label'], 'step': row['step'], 'mean': row['mean'],
                        'device_seconds_per_image': None if seconds is None else seconds * (row['step'] / last if last
                                                                                             else 1),
                        'cost_estimated': 0 < row['step'] < last, 'run_device_seconds_per_image': seconds,
                        'runs': len(runs), **gain,
                        'gain_columns': len(diffs), 'curve': curve if curve and len(curve['steps']) > 2 else None})
    return methods


def fmt(c):
    if c['value'] is None:
        return c['status']
    mark = ('*' if c['status'] == 'partial' else '') + ('\u2020' if c.get('source') == 'accuracy.txt' else '')
    return f"{c['value']:.1f}{mark}"


def markdown(summary):
    cols = summary['columns']
    n_mean = len(summary['mean_over'])
    covered = {summary['corruptions'][c] for c in summary['mean_over']}
    if not covered <= set(CORRUPTIONS):
        mean_label = f'mean of {n_mean}'
    else:
        mean_label = 'mean' if len(covered) == len(CORRUPTIONS) else f'mean ({len(covered)}/{len(CORRUPTIONS)})'
    lines = ['| method | ' + ' | '.join(cols) + f' | {mean_label} |',
             '|---|' + '---:|' * (len(cols) + 1)]
    notes = [f"top-1 {summary['metric']} (%)" + (' = 100 - accuracy' if summary['metric'] == 'error' else '')]
    if len(summary['selections']) == 1:
        notes.append(f"images: {next(iter(summary['selections']))}, in every run")
    else:
        notes += [f"images: {text}: {', '.join(runs)}" for text, runs in summary['selections'].items()]
    for row in summary['rows']:
        lines.append(f"| {row['label']} | " + ' | '.join(fmt(row['cells'][c]) for c in cols)
                     + f" | {fmt(row['mean'])} |")
        for c in cols:
            x = row['cells'][c]
            if x['status'] == 'partial':
                notes.append(f"* partial: {row['label']}, {c}: {x['num_images']}/{x['num_images_expected']} images")
        if row['mean']['status'] == 'partial':
            notes.append(f"* {row['label']}: the mean includes partial runs (--allow_partial)")
    if any(x.get('source') == 'accuracy.txt' for row in summary['rows'] for x in row['cells'].values()):
        notes.append('\u2020 read from accuracy.txt (released format), which does not record whether the run finished')
    if summary['not_run']:
        notes.append(f"not run: {', '.join(summary['not_run'])}")
    c = summary['cost']
    labels = {'ttt': 'TTT-MAE', **FIXED_MODELS}
    notes.append(f"device time: {c['total_device_hours']:.3g} device-hours ("
                 + ', '.join(f"{labels.get(m, m)} {h:.3g}" for m, h in c['device_hours'].items() if m in c['methods_run'])
                 + ')'
                 + (f" on {', '.join(c['devices'])}" if c['devices'] else '')
                 + (f"; {c['runs_without_record']} runs record none (accuracy.txt, or an older results.json)"
                    if c['runs_without_record'] else ''))
    if summary['columns'] != summary['mean_over']:
        notes.append('the mean is over the standard corruptions only, not (' + ', '.join(
            c for c in cols if c not in summary['mean_over']) + ')')
    return '\n'.join(lines + [''] + notes + [''] + methods_markdown(summary)) + '\n'


def methods_markdown(summary):
    """The methods at their cost: a line each."""
    lines = [f"| method at its cost | {mean_name(summary)} | paired gain over no adaptation ± SE | device-s per image |",
             '|---|---:|---:|---:|']
    for m in summary['methods']:
        gain = '' if m.get('gain') is None else f"{m['gain']:+.1f} ± {m['gain_se']:.1f}"
        seconds = '' if m['device_seconds_per_image'] is None else \
            ('~' if m['cost_estimated'] else '') + f"{m['device_seconds_per_image']:.3g}"
        lines.append(f"| {m['label']} | {fmt(m['mean'])} | {gain} | {seconds} |")
    return lines + ['', 'Gain: per image, correct with the method - correct without adaptation, in points of accuracy '
                        'over the finished runs with per_image.npz (images averaged over the test sets where they hold '
                        'the same images, pooled otherwise); SE = sample std / sqrt(n). Device-seconds: results.json\'s '
                        'device_seconds over its images (every process, resumed parts included); ~: of the step '
                        'tabulated, estimated as its share of the run\'s steps.']


def mean_name(summary):
    """The metric's name, and of how many test sets its mean is (the ImageNet-C mean: of the standard corruptions)."""
    covered = {summary['corruptions'][c] for c in summary['mean_over']}
    return f"mean {summary['metric']}" + ('' if covered <= set(CORRUPTIONS) else f" of {len(summary['mean_over'])}")


def to_csv(summary):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['method', 'label', 'step', 'corruption', summary['metric'], 'status', 'num_images',
                'num_images_expected', 'source'])
    for row in summary['rows']:
        for c, x in list(row['cells'].items()) + [('mean', row['mean'])]:
            # csv writes None as an empty field and floats at full precision
            w.writerow([row['method'], row['label'], row['step'], c, x['value'], x['status'],
                        x.get('num_images'), x.get('num_images_expected'), x.get('source')])
    return buf.getvalue()


def plot(summary, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 5.5))
    tab20 = plt.get_cmap('tab20').colors
    colors = tab20[0::2] + tab20[1::2]  # the 10 strong colours first; a corruption keeps its colour across sweeps
    baseline = summary['rows'][0]['cells']
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    for c in summary['columns']:
        corruption = summary['corruptions'][c]
        color = colors[known.index(corruption) if corruption else summary['columns'].index(c) % len(colors)]
        if c in summary['curves']:
            curve = summary['curves'][c]
            ax.plot(curve['steps'], curve['value'], color=color, lw=1,
                    ls='-' if curve['complete'] else '--', label=c + ('' if curve['complete'] else ' (partial)'))
        if baseline[c]['value'] is not None:
            ax.plot([0], [baseline[c]['value']], marker='s', mfc='none', color=color, ls='none',
                    label=None if c in summary['curves'] else f'{c} (baseline only)')
    if summary['mean_curve']:
        m = summary['mean_curve']
        ax.plot(m['steps'], m['value'], color='black', lw=3,
                label=f"mean of {len(m['corruptions'])} complete runs")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel('TTT step (0 = before adaptation; squares: baseline)')
    ax.set_ylabel(f"top-1 {summary['metric']} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
    save_png(fig, path, 120, metadata={'Title': title})


def plot_cost(summary, path, title):
    """Accuracy (or error) against device-seconds per image: a point per method, a method's steps as a curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in summary['methods']:
        if m['device_seconds_per_image'] is None or m['mean']['value'] is None:
            continue
        if m['curve'] and m['curve'].get('device_seconds_per_image'):
            x, y = m['curve']['device_seconds_per_image'][1:], m['curve']['value'][1:]
            line, = ax.plot(x, y, marker='o', ms=3, lw=1, label=f"{m['label'].rsplit(' (step', 1)[0]} (steps 1..)")
            ax.plot([m['device_seconds_per_image']], [m['mean']['value']], marker='o', ms=7, color=line.get_color())
        else:
            ax.plot([m['device_seconds_per_image']], [m['mean']['value']], marker='s', ms=7, ls='none', label=m['label'])
    ax.set_xscale('log')
    ax.set_xlabel('device-seconds per image (a curve\'s steps: their share of the run\'s time)')
    ax.set_ylabel(f"{mean_name(summary)} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    save_png(fig, path, 120)


def known_references():
    return sorted(os.path.splitext(f)[0] for f in os.listdir(REFERENCES) if f.endswith('.json'))


def load_reference(name):
    """A reference table ({'source', 'metric', 'rows': {label: {'method', 'values', 'mean'}}}), checked."""
    path = name if name.endswith('.json') or os.sep in name else os.path.join(REFERENCES, name + '.json')
    if not os.path.exists(path):
        raise UserError(f"unknown reference {name!r}: neither a file nor one of {', '.join(known_references())}")
    form = ("a JSON object {'source': TEXT, 'rows': {LABEL: {'method': ttt|" + '|'.join(FIXED_MODELS) +
            ", 'values': {CORRUPTION: NUMBER}}}} (docs/results/references/paper.json)")
    try:
        with open(path) as f:
            reference = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read reference {path}: {type(e).__name__}: {e}") from None
    rows = reference.get('rows') if isinstance(reference, dict) else None
    if not isinstance(rows, dict):
        raise UserError(f"reference {path} holds no rows: it must be {form}")
    for label, row in rows.items():
        values = row.get('values') if isinstance(row, dict) else None
        if not isinstance(values, dict) or row.get('method') not in ('ttt', *FIXED_MODELS):
            raise UserError(f"reference {path}: row {label!r} needs 'method' (ttt, {', '.join(FIXED_MODELS)}) and "
                            f"'values' {{corruption: number}}")
        unknown = [c for c in values if c not in CORRUPTIONS + EXTRA_CORRUPTIONS]
        bad = [c for c, v in values.items() if not isinstance(v, (int, float))]
        if unknown or bad:
            raise UserError(f"reference {path}: row {label!r} has " + (f"corruptions that are not ImageNet-C's: "
                            f"{', '.join(unknown)}" if unknown else f"values that are not numbers: {', '.join(bad)}"))
    return {**reference, 'file': os.path.abspath(path)}


def compare_with(summary, reference):
    """Each reference row under the run's row of the same method, and each column's difference; for a run of
    fewer images than the full set, whether the difference is within 2 of its own standard errors
    (sqrt(p (1 - p) / n) of its accuracy p over its n images)."""
    ours = {row['method']: row for row in summary['rows']}
    compared = []
    for label, ref in reference['rows'].items():
        values = {c: (100 - v if summary['metric'] == 'error' else v) for c, v in ref['values'].items()}
        # by column: a corruption's own folder, or its severity 5 (the paper's) in <corruption>/<severity> folders
        values = {c: values[k] for c, k in summary['corruptions'].items() if k in values and c in (k, f'{k}/5')}
        row, cells = ours.get(ref['method']), {}
        for c in summary['columns']:
            if c not in values or row is None or row['cells'][c]['value'] is None:
                continue
            x = row['cells'][c]
            diff = x['value'] - values[c]
            subset = x.get('selection') is not None and not x['selection'].get('all')
            se = 100 * math.sqrt(x['value'] / 100 * (1 - x['value'] / 100) / x['num_images']) \
                if subset and x.get('num_images') else None
            cells[c] = {'reference': values[c], 'difference': diff, 'se': se,
                        'within_2se': None if se is None else abs(diff) <= 2 * se}
        compared.append({'label': label, 'method': ref['method'], 'ours': row['label'] if row else None,
                         'values': values, 'cells': cells})
    return {'source': reference.get('source'), 'file': reference['file'], 'rows': compared}


def reference_markdown(summary):
    cols, ref = summary['columns'], summary['reference']
    lines = ['', f"Reference: {ref['source']} ({ref['file']})", '',
             '| row | ' + ' | '.join(cols) + ' |', '|---|' + '---:|' * len(cols)]
    for row in ref['rows']:
        lines.append(f"| {row['label']} | " + ' | '.join(f"{row['values'][c]:.1f}" if c in row['values'] else ''
                                                       for c in cols) + ' |')
        if row['ours']:
            def diff(c):
                x = row['cells'].get(c)
                if x is None:
                    return ''
                mark = '' if x['within_2se'] is None else (' ok' if x['within_2se'] else ' !')
                return f"{x['difference']:+.1f}{mark}"
            lines.append(f"| {row['ours']} - {row['label']} | " + ' | '.join(diff(c) for c in cols) + ' |')
    if any(x['within_2se'] is not None for row in ref['rows'] for x in row['cells'].values()):
        lines += ['', 'ok / !: the difference is within / beyond 2 standard errors of the run\'s own sampling error '
                      '(runs of fewer images than the full set)']
    return '\n'.join(lines) + '\n'


def compare_roots(roots, labels, step_metric):
    """Several sweeps side by side (ablations, or a root per method): the mean accuracy per step of each root's
    adapting runs (its only method, or TTT-MAE among several), and every root's methods at their cost."""
    curves, methods = [], []
    for root, label in zip(roots, labels):
        summary = collect(root, None, False, step_metric)
        adapting = [m for m in summary['methods'] if m['method'] not in FIXED_MODELS]
        main = next((m for m in adapting if m['method'] == 'ttt'), adapting[0] if len(adapting) == 1 else None)
        runs = summary['mean_curve'] if main and main['method'] == 'ttt' else (main or {}).get('curve')
        if not runs:
            raise UserError(f"{root} has no complete run of one method to average (its rows: "
                            f"{', '.join(m['label'] for m in adapting) or 'none'})")
        curves.append({'label': label, 'root': os.path.abspath(root), 'steps': runs['steps'], 'value': runs['value'],
                       'corruptions': runs['corruptions']})
        methods += [{**m, 'label': f"{label}: {m['label']}"} for m in summary['methods']]
    return {'metric': step_metric, 'curves': curves, 'methods': methods,
            'mean_over': summary['mean_over'], 'corruptions': summary['corruptions']}


def comparison_markdown(comparison):
    last = max(max(c['steps']) for c in comparison['curves'])
    lines = ['| run | corruptions | ' + ' | '.join(f'step {k}' for k in range(last + 1)) + ' |',
             '|---|---:|' + '---:|' * (last + 1)]
    for c in comparison['curves']:
        by_step = dict(zip(c['steps'], c['value']))
        lines.append(f"| {c['label']} | {len(c['corruptions'])} | "
                     + ' | '.join(f'{by_step[k]:.1f}' if k in by_step else '' for k in range(last + 1)) + ' |')
    return '\n'.join(lines + ['', f"mean top-1 {comparison['metric']} (%) over each run's complete corruptions, "
                                   'per TTT step (step 0: before adaptation)']) + '\n'


def plot_comparison(comparison, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in comparison['curves']:  # each up to its own last step
        ax.plot(c['steps'], c['value'], marker='o', ms=3, label=f"{c['label']} ({len(c['corruptions'])} corruptions)")
    ax.set_xlabel('TTT step (0 = before adaptation)')
    ax.set_ylabel(f"mean top-1 {comparison['metric']} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, 120)


def main(args):
    if len(args.roots) > 1:
        labels = args.labels or [os.path.basename(os.path.abspath(r)) for r in args.roots]
        if len(labels) != len(args.roots):
            raise UserError(f"--labels gives {len(labels)} names for {len(args.roots)} roots")
        if args.reference or args.step is not None:
            raise UserError("--reference and --step take one root; several roots are compared step by step")
        comparison = compare_roots(args.roots, labels, args.metric)
        prefix = args.out or os.path.join(os.path.dirname(os.path.abspath(args.roots[0])), 'comparison')
        table = comparison_markdown(comparison) + '\n' + '\n'.join(methods_markdown(comparison)) + '\n'
        print(table, end='')
        write_text(prefix + '.md', table)
        write_json(prefix + '.json', comparison)
        plot_comparison(comparison, prefix + '.png', args.title or 'TTT-MAE: ' + ' vs '.join(labels))
        plot_cost(comparison, prefix + '_cost.png', 'accuracy against cost: ' + ', '.join(labels))
        print(f"\nwrote {prefix}.md, {prefix}.json, {prefix}.png, {prefix}_cost.png")
        return
    args.root = args.roots[0]
    reference = load_reference(args.reference) if args.reference else None  # a bad one stops before any output
    summary = collect(args.root, args.step, args.allow_partial, args.metric, args.columns)
    prefix = args.out or os.path.join(args.root, 'summary')
    table = markdown(summary)
    if reference:
        summary['reference'] = compare_with(summary, reference)
        table += reference_markdown(summary)
    print(table, end='')
    write_text(prefix + '.csv', to_csv(summary))
    write_json(prefix + '.json', summary)
    title = args.title or f"ImageNet-C: {os.path.basename(os.path.abspath(args.root))}"
    plot(summary, prefix + '.png', title)
    plot_cost(summary, prefix + '_cost.png', f"{title}: accuracy against cost")
    print(f"\nwrote {prefix}.csv, {prefix}.json, {prefix}.png, {prefix}_cost.png")


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
