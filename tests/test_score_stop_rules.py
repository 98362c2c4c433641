"""util/stop_rules.py and scripts/score_stop_rules.py: rules scored on finished runs, chosen on other runs, and the
same rule applied live by main_test_time_training.py --stop_rule."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, check_error_line, make_image_folder, run_inprocess
from test_main_test_time_training import per_image, ttt_command
from util.cli import run_main
from util.errors import UserError
from util.stop_rules import fires, parse, stop_step

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import score_stop_rules as step_rules  # noqa: E402


def test_each_rule_fires_where_it_says():
    preds, probs, losses = [3, 3, 5, 5, 5, 5], [0.4, 0.5, 0.6, 0.95, 0.7, 0.99], [1.0, 0.8, 0.79, 0.5, 0.49]
    assert stop_step('fixed', 2, preds, probs, losses) == 2
    assert stop_step('stable', 1, preds, probs, losses) == 1  # step 1 repeats step 0's prediction
    assert stop_step('stable', 2, preds, probs, losses) == 4
    assert stop_step('plateau', 0.05, preds, probs, losses) == 3  # 0.8 -> 0.79 is a 1.25% fall, known after step 3
    assert stop_step('confident', 0.9, preds, probs, losses) == 3
    assert stop_step('confident', 0.999, preds, probs, losses) == 5  # never: the last step
    assert not fires('plateau', 0.5, 1, preds, probs, losses)  # one loss: no fall to measure yet


@pytest.mark.parametrize('text, fragment', [('soon:3', "unknown stopping rule 'soon'; choices: fixed:INT"),
                                            ('stable:two', 'stable takes an integer'),
                                            ('stable:0', 'must be >= 1'), ('confident:1', 'must be > 0 and < 1'),
                                            ('plateau:-0.1', 'must be >= 0 and < 1')])
def test_bad_rules_are_one_line(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse(text)


@pytest.fixture(scope='module')
def runs(checkpoints, tmp_path_factory):
    """Full runs of two folders (6 steps), and a live run of the first with a rule."""
    root = tmp_path_factory.mktemp('rules')
    folders = [make_image_folder(root / name, ['class_a', 'class_b'], 6, seed=seed)
               for seed, name in ((3, 'a'), (4, 'b'))]
    for folder, out in zip(folders, ('full_a', 'full_b')):
        run_inprocess(ttt_command(checkpoints, folder, root / out, '--steps_per_example', '6'))
    return root, folders


@pytest.mark.parametrize('rule', ['stable:2', 'confident:0.6', 'plateau:0.02'])
def test_a_live_run_predicts_what_the_rule_on_the_full_run_says(runs, checkpoints, rule):
    root, folders = runs
    out = root / f'live_{rule.replace(":", "_")}'
    run_inprocess(ttt_command(checkpoints, folders[0], out, '--steps_per_example', '6', '--stop_rule', rule))
    full, live = per_image(root / 'full_a'), per_image(out)
    stops = step_rules.stops_of(step_rules.load_runs([str(root / 'full_a')]), rule)
    assert np.array_equal(live['stop_step'], stops) and stops.min() < 6
    assert np.array_equal(live['pred'][:, -1], full['pred'][np.arange(len(stops)), stops])
    assert live['pred'].shape == full['pred'].shape  # the width kept
    results = json.loads((out / 'results.json').read_text())
    assert results['mean_steps_used'] == pytest.approx(stops.mean())


def test_the_table_the_choice_on_other_runs_and_the_figure(runs, tmp_path, capsys):
    root, _ = runs
    prefix = tmp_path / 'rules'
    run_main(step_rules.main, step_rules.get_args_parser().parse_args(
        [str(root / 'full_a'), '--choose_on', str(root / 'full_b'), '--out', str(prefix)]))
    summary = json.loads((tmp_path / 'rules.json').read_text())
    rows = {r['rule']: r for r in summary['rows']}
    full = per_image(root / 'full_a')
    correct = full['pred'] == full['label'][:, None]
    assert rows['fixed:6']['accuracy'] == pytest.approx(100 * correct[:, -1].mean())
    assert rows['fixed:0']['gain_vs_none'] == 0 and rows['fixed:6']['gain_vs_last'] == 0
    assert rows['fixed:3']['mean_steps'] == 3 and rows['fixed:3']['cost'] == 0.5
    assert rows['oracle']['accuracy'] == pytest.approx(100 * correct.any(1).mean()) and rows['oracle']['uses_labels']
    chosen = summary['chosen']
    assert set(chosen['rules']) == {'fixed', 'stable', 'plateau', 'confident'}
    other = step_rules.collect([str(root / 'full_b')])  # the choice is the best there, not on the reported runs
    best = step_rules.choose([r for r in other['rows'] if r['rule'] != 'oracle'])
    assert chosen['rules'] == {f: r['rule'] for f, r in best.items()}
    table = (tmp_path / 'rules.md').read_text()
    assert 'oracle (uses the labels: an upper bound)' in table and 'chosen on 12 images of 1 other runs' in table
    assert (tmp_path / 'rules.png').read_bytes()[:4] == b'\x89PNG'


def test_runs_without_the_signals_or_stopped_early_are_one_line(runs, tmp_path, capsys):
    root, _ = runs
    old = tmp_path / 'old'
    old.mkdir()
    records = per_image(root / 'full_a')
    np.savez(old / 'per_image.npz', **{k: v for k, v in records.items() if k not in ('top1_prob', 'entropy')})
    code = None
    try:
        run_main(step_rules.main, step_rules.get_args_parser().parse_args([str(old)]))
    except SystemExit as e:
        code = e.code
    check_error_line(code, *capsys.readouterr(), ['records no per-step top-1 probabilities', 'rerun'])
    stopped = tmp_path / 'stopped'  # as a --stop_rule run leaves it
    stopped.mkdir()
    np.savez(stopped / 'per_image.npz', **records, stop_step=np.zeros(len(records['index']), np.int64))
    with pytest.raises(UserError, match='stopped early by --stop_rule'):
        step_rules.load_runs([str(stopped)])


def test_runs_read_the_objective_whatever_the_losses_are_named(runs, tmp_path):
    """The rules read each step's objective, never a loss by its name: runs of a model whose losses have other
    names are scored by every family, as the same runs with the MAE loss."""
    root, _ = runs
    folders = []
    for name in ('full_a', 'full_b'):
        folder = tmp_path / name
        folder.mkdir()
        records = per_image(root / name)
        np.savez(folder / 'per_image.npz', **{('recon_loss' if k == 'mae_loss' else k): v for k, v in records.items()})
        folders.append(str(folder))
    summary = step_rules.collect(folders)
    assert {step_rules.family(r['rule']) for r in summary['rows']} == {'fixed', 'stable', 'plateau', 'confident', 'oracle'}
    assert summary['rows'] == step_rules.collect([str(root / 'full_a'), str(root / 'full_b')])['rows']


def test_older_runs_without_a_recorded_objective(runs, tmp_path):
    """Older versions recorded the losses only: the MAE loss alone was the objective; other losses' weights are
    not known, and such a run is refused in one line."""
    root, _ = runs
    records = per_image(root / 'full_a')
    older = {k: v for k, v in records.items() if k != 'objective'}
    (tmp_path / 'mae').mkdir()
    np.savez(tmp_path / 'mae' / 'per_image.npz', **older)
    assert np.array_equal(step_rules.load_runs([str(tmp_path / 'mae')])['objective'], records['mae_loss'])
    (tmp_path / 'two').mkdir()
    np.savez(tmp_path / 'two' / 'per_image.npz', **older, tv_loss=records['mae_loss'])
    with pytest.raises(UserError, match='records no objective per step .* mae_loss, tv_loss'):
        step_rules.load_runs([str(tmp_path / 'two')])


def test_the_fast_modes_refuse_a_stop_rule(checkpoints, tmp_path, user_error):
    user_error(ttt_command(checkpoints, str(tmp_path), tmp_path / 'o', '--stop_rule', 'stable:2', '--compile'),
               '--stop_rule stops images one at a time')
    user_error(ttt_command(checkpoints, str(tmp_path), tmp_path / 'o', '--stop_rule', 'fixed:9'),
               'fixed:9 stops after more steps than --steps_per_example 3')
