"""The built-in example end to end at tiny sizes: scripts/demo.sh, the script `make demo` runs."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import run_script

CORRUPTIONS = ['gaussian_noise', 'pixelate']
STEPS = 5
REPORT = 4  # demo.sh's default tabulated step
STREAMS = ('clean', 'in_turn', 'shuffled')
PER_CLASS = 2  # corrupted and evaluated test images per class
TINY = {'DEMO_DIGITS': '20 5 5', 'DEMO_EVAL_PER_CLASS': str(PER_CLASS), 'DEMO_CORRUPTIONS': ' '.join(CORRUPTIONS),
        'DEMO_PRETRAIN_EPOCHS': '2', 'DEMO_PRETRAIN_WARMUP': '1', 'DEMO_PRETRAIN_BATCH': '64',
        'DEMO_PROBE_EPOCHS': '1', 'DEMO_PROBE_BATCH': '64', 'DEMO_TTT_STEPS': str(STEPS), 'DEMO_TTT_BATCH': '8',
        'DEMO_THREADS': '1', 'DEMO_TTT_COMPILE': '0',  # compilation is tested in test_engine_test_time.py
        # two of the study's levers, at values other than their defaults
        'DEMO_HEAD_DEPTH': '2', 'DEMO_TTT_FINETUNE_MODE': 'encoder_no_cls_no_msk'}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def stage_times(out):
    with open(os.path.join(out, 'results_test', 'stage_times.tsv')) as f:
        return {row['stage']: row for row in csv.DictReader(f, delimiter='\t')}


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('demo') / 'demo_out')
    env = {**TINY, 'PYTHON': sys.executable, 'DEMO_OUT': out}
    first = run_script(['bash', 'scripts/demo.sh'], env=env)
    return out, env, first


def test_every_stage_ran_and_wrote_its_outputs(demo):
    out, _, first = demo
    times = stage_times(out)
    expected = ['digits', 'pretrain', 'probe', f'corrupt test ({10 * PER_CLASS * len(CORRUPTIONS)} images)',
                'clean test baseline'] + [f'{c} {m}' for c in CORRUPTIONS
                                          for m in ('baseline', 'TTT-MAE', 'TTT-MAE online')] \
        + ["figure's images", "figure's reconstructions", 'stream of the corruptions'] \
        + [f'{s} stream {m}' for s in STREAMS for m in ('baseline', 'online')] \
        + ['stream gains', 'collect', 'paired gains', 'step rules', 'total']
    assert list(times) == expected
    assert all(t['status'] == 'ran' and float(t['seconds']) >= 0 for t in times.values())
    assert read_json(f'{out}/digits/digits.json')['counts'] == {'train': 200, 'val': 50, 'test': 50}
    for ckpt in ('pretrain/checkpoint-final.pth', 'probe/checkpoint-final.pth'):
        assert os.path.isfile(os.path.join(out, ckpt))
    assert torch.load(f'{out}/pretrain/checkpoint-final.pth', weights_only=False)['args'].norm_pix_loss
    probe = torch.load(f'{out}/probe/checkpoint-final.pth', weights_only=False)
    assert probe['args'].classifier_depth == 2 and 'classifier_blocks.1.norm1.weight' in probe['model']
    for c in CORRUPTIONS:
        folder = f'{out}/digits-c/test/{c}/5'
        assert sorted(os.listdir(folder)) == [str(d) for d in range(10)]
        assert all(len(os.listdir(f'{folder}/{d}')) == PER_CLASS for d in range(10))
    assert read_json(f'{out}/clean_test/results.json')['num_images'] == 50
    for name in ('summary.csv', 'summary.json', 'summary.png', 'paired_gain.md', 'paired_gain.json', 'step_rules.md',
                 'step_rules.json', 'step_rules.png'):
        assert os.path.getsize(f'{out}/results_test/{name}') > 0
    assert '| mean of 2 |' in first.stdout and 'TTT-MAE online (step 1)' in first.stdout
    for c in CORRUPTIONS:  # the first images of each episodic run, pictured
        assert len(os.listdir(f'{out}/results_test/{c}/reconstructions')) == 3
    for c in CORRUPTIONS:  # DEMO_HEAD_DEPTH reaches every evaluation, DEMO_TTT_FINETUNE_MODE the episodic runs
        for run, mode, optimizer in (('', 'encoder_no_cls_no_msk', 'adam'), ('baseline/', None, None),
                                     ('online/', 'all', 'adam_w')):
            config = read_json(f'{out}/results_test/{c}/{run}run_config.json')
            assert config['classifier_depth'] == 2 and config.get('finetune_mode') == mode, (c, run)
            assert config.get('optimizer_type') == optimizer, (c, run)  # the example's Adam: episodic runs only
    online = read_json(f'{out}/results_test/{CORRUPTIONS[0]}/online/results.json')
    assert online['online'] and online['complete'] and len(online['accuracy_per_step']) == 2  # main_online_ttt.py: 1 step


def test_the_streams_hold_the_corruptions_in_turn_or_shuffled_against_no_adaptation_on_the_same_images(demo):
    out, _, first = demo
    root = f'{out}/results_test/streams'
    listed = open(f'{out}/digits-c/test/stream_5/stream.txt').read().split()
    assert [r.split('/')[1].split('__')[0] for r in listed] == [c for c in CORRUPTIONS for _ in range(10 * PER_CLASS)]
    orders = {}
    for name in STREAMS:
        online, base = (np.load(f'{root}/{name}/{sub}per_image.npz') for sub in ('', 'baseline/'))
        assert np.array_equal(online['index'], base['index']) and np.array_equal(online['filename'], base['filename'])
        assert np.array_equal(online['pred'][:, 0][online['position'] == 0], base['pred'][:, 0][online['position'] == 0])
        orders[name] = [str(f) for f in online['filename'][np.argsort(online['position'])]]
    assert len(orders['clean']) == 50  # all 50 test digits (fewer than DEMO_STREAM_IMAGES)
    assert orders['in_turn'] == listed
    assert sorted(orders['shuffled']) == sorted(orders['in_turn']) and orders['shuffled'] != orders['in_turn']
    gains = read_json(f'{root}/paired_gain.json')
    assert gains['columns'] == list(STREAMS) and gains['method'] == 'TTT-MAE online'
    assert '| mean of' not in open(f'{root}/paired_gain.md').read()


def test_the_figure_shows_the_images_its_rule_picks(demo):
    out, _, _ = demo
    run = np.load(f'{out}/results_test/{CORRUPTIONS[0]}/per_image.npz')
    order = np.argsort(run['index'])
    correct = run['pred'][order] == run['label'][order, None]
    rule = [run['filename'][order][np.flatnonzero(t)[0]] for t in (~correct[:, 0] & correct[:, REPORT],
                                                                    correct[:, 0] & ~correct[:, REPORT]) if t.any()]
    rule = rule or [run['filename'][order][0]]
    picked = open(f'{out}/results_test/figure/images.txt').read().split()
    assert picked == [str(f) for f in rule]
    pictures = sorted(os.listdir(f'{out}/results_test/figure/run/reconstructions'))
    assert [p.split('_', 1)[1][:-len('.png')] for p in pictures] == sorted(
        os.path.splitext(os.path.basename(f))[0] for f in picked)


def test_step0_of_ttt_is_the_baseline_on_the_same_images(demo):
    out, _, _ = demo
    for c in CORRUPTIONS:
        ttt_json, base_json = read_json(f'{out}/results_test/{c}/results.json'), \
            read_json(f'{out}/results_test/{c}/baseline/results.json')
        assert ttt_json['complete'] and base_json['complete']
        assert ttt_json['num_images'] == base_json['num_images'] == 10 * PER_CLASS
        assert len(ttt_json['accuracy_per_step']) == STEPS + 1
        assert ttt_json['accuracy_per_step'][0] == pytest.approx(base_json['accuracy'])
        ttt, base = (np.load(f'{out}/results_test/{c}/{sub}per_image.npz') for sub in ('', 'baseline/'))
        for key in ('index', 'label', 'filename'):
            assert np.array_equal(ttt[key], base[key]), key
        assert ttt['pred'].shape == (10 * PER_CLASS, STEPS + 1)
        assert np.array_equal(ttt['pred'][:, 0], base['pred'][:, 0])
        np.testing.assert_allclose(ttt['ce_loss'][:, 0], base['ce_loss'][:, 0], rtol=1e-4, atol=1e-5)


def test_tables_report_the_runs_numbers(demo):
    out, _, _ = demo
    root = f'{out}/results_test'
    with open(f'{root}/summary.csv') as f:
        rows = {(r['method'], r['corruption']): r for r in csv.DictReader(f)}
    gains = read_json(f'{root}/paired_gain.json')
    assert gains['columns'] == CORRUPTIONS
    for c in CORRUPTIONS:
        ttt = read_json(f'{root}/{c}/results.json')['accuracy_per_step'][REPORT]
        base = read_json(f'{root}/{c}/baseline/results.json')['accuracy']
        assert float(rows[('baseline', c)]['accuracy']) == pytest.approx(base)
        assert float(rows[('ttt', c)]['accuracy']) == pytest.approx(ttt)
        g = gains['rows'][c]
        assert (g['baseline'], g['ttt'], g['step']) == (pytest.approx(base), pytest.approx(ttt), REPORT)
        t, b = np.load(f'{root}/{c}/per_image.npz'), np.load(f'{root}/{c}/baseline/per_image.npz')
        d = (t['pred'][:, REPORT] == t['label']).astype(float) - (b['pred'][:, 0] == b['label'])
        assert g['gain'] == pytest.approx(100 * d.mean())
        assert g['gain_se'] == pytest.approx(100 * d.std(ddof=1) / np.sqrt(len(d)))
        assert g['gain'] == pytest.approx(ttt - base)
        assert g['gain_per_step'][REPORT] == pytest.approx(g['gain']) and g['gain_per_step'][0] == 0
        top = [np.bincount(p).max() / len(p) * 100 for p in (b['pred'][:, 0], t['pred'][:, REPORT])]
        assert g['top_class_share'] == pytest.approx(top)
    mean = np.mean([gains['rows'][c]['gain'] for c in CORRUPTIONS])
    assert gains['mean']['gain'] == pytest.approx(mean)  # same images in every corruption
    assert gains['mean']['gain_per_step'] == pytest.approx(
        np.mean([gains['rows'][c]['gain_per_step'] for c in CORRUPTIONS], axis=0))


def test_rerun_skips_every_finished_stage(demo):
    out, env, _ = demo
    results = f'{out}/results_test/{CORRUPTIONS[0]}/results.json'
    before = os.stat(results).st_mtime_ns
    run_script(['bash', 'scripts/demo.sh'], env=env)
    times = stage_times(out)
    ran = [name for name, t in times.items() if t['status'] == 'ran']
    assert ran == ['stream of the corruptions', 'stream gains', 'collect', 'paired gains', 'step rules', 'total']
    assert os.stat(results).st_mtime_ns == before


def test_other_settings_on_finished_folders_stop_the_demo(demo):
    out, env, _ = demo
    checkpoint = f'{out}/pretrain/checkpoint-final.pth'
    before = os.stat(checkpoint).st_mtime_ns
    changed = run_script(['bash', 'scripts/demo.sh'], env={**env, 'DEMO_NORM_PIX': '0'}, check=False)
    assert changed.returncode == 2
    assert f'error: {out}/pretrain was made by other settings' in changed.stderr
    assert 'Delete' in changed.stderr.splitlines()[-1] and '== pretrain' not in changed.stdout
    assert os.stat(checkpoint).st_mtime_ns == before
    late = run_script(['bash', 'scripts/demo.sh'], env={**env, 'DEMO_REPORT_STEP': str(STEPS + 1)}, check=False)
    assert late.returncode == 2 and 'after the last TTT step' in late.stderr
    shallow = run_script(['bash', 'scripts/demo.sh'], env={**env, 'DEMO_HEAD_DEPTH': '0'}, check=False)
    assert shallow.returncode == 2 and 'DEMO_HEAD_DEPTH must be a whole number >= 1' in shallow.stderr
