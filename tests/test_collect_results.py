import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'collect_results.py')
ARGS_LINE = "Namespace(batch_size=128, blr=0.01, data_path='imagenet-c/x/5')\n"


def collect(*flags):
    return subprocess.run([sys.executable, SCRIPT, *map(str, flags)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def ttt_json(folder, accs, n=100, expected=100):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'results.json').write_text(json.dumps({
        'method': 'ttt', 'accuracy_per_step': accs, 'num_images': n, 'num_images_expected': expected,
        'complete': n == expected, 'steps_per_example': len(accs) - 1, 'wall_time_s': 1.0,
        'images_per_s': 1.0, 'args': {}}))


def baseline_json(folder, acc, n=100, expected=100):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'results.json').write_text(json.dumps({
        'method': 'baseline', 'accuracy_per_step': [acc], 'accuracy': acc, 'loss': 4.5, 'num_images': n,
        'num_images_expected': expected, 'complete': n == expected}))


def released_ttt(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'accuracy.txt').write_text(ARGS_LINE + ''.join(f'{s}\t{a}\n' for s, a in lines))


def released_baseline(folder, acc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'accuracy.txt').write_text(ARGS_LINE + f'{acc} 3.25\n')


@pytest.fixture
def complete_root(tmp_path):
    """Three complete corruptions in both formats (values exact in binary, so the means are exact)."""
    root = tmp_path / 'sweep'
    ttt_json(root / 'gaussian_noise', [10.0, 20.0, 30.25])
    baseline_json(root / 'gaussian_noise' / 'baseline', 10.0)
    # released numbering: line i is after i + 1 steps; step 0 comes from the baseline (40.5)
    released_ttt(root / 'fog', [(0, 44.5), (1, 45.0)])  # stored before shot_noise: order is standard
    released_baseline(root / 'fog' / 'baseline', 40.5)
    ttt_json(root / 'shot_noise', [5.0, 7.5, 12.0])
    baseline_json(root / 'shot_noise' / 'baseline', 4.75)
    # our runs write accuracy.txt too: results.json wins
    released_ttt(root / 'shot_noise', [(0, 99.0), (1, 99.0)])
    return root


def markdown_rows(stdout, table=0):
    """The rows of the table-th Markdown table printed (0: the results; 1: the methods at their cost; then any
    reference)."""
    tables, last = [], False
    for line in stdout.splitlines():
        if line.startswith('|'):
            if not last:
                tables.append([])
            tables[-1].append([c.strip() for c in line.strip('|').split('|')])
        last = line.startswith('|')
    return tables[table] if table < 2 else [row for t in tables[2:] for row in t]


def test_table_means_and_outputs(complete_root):
    r = collect(complete_root)
    assert r.returncode == 0, r.stderr
    header, _, baseline, ttt = markdown_rows(r.stdout)
    assert header == ['method', 'gaussian_noise', 'shot_noise', 'fog', 'mean (3/15)']
    assert baseline == ['no adaptation', '10.0', '4.8', '40.5\u2020', '18.4']  # (10 + 4.75 + 40.5) / 3
    assert ttt == ['TTT-MAE (step 2)', '30.2', '12.0', '45.0\u2020', '29.1']  # (30.25 + 12 + 45) / 3
    assert 'not run: impulse_noise' in r.stdout

    summary = json.loads((complete_root / 'summary.json').read_text())
    rows = {row['method']: row for row in summary['rows']}
    assert rows['baseline']['mean'] == {'value': (10.0 + 4.75 + 40.5) / 3, 'status': 'complete'}
    assert rows['ttt']['mean'] == {'value': (30.25 + 12.0 + 45.0) / 3, 'status': 'complete'}
    assert rows['ttt']['cells']['fog']['source'] == 'accuracy.txt'
    assert rows['ttt']['cells']['shot_noise']['source'] == 'results.json'
    assert summary['mean_curve']['steps'] == [0, 1, 2]
    assert summary['mean_curve']['value'] == [55.5 / 3, 72.0 / 3, 87.25 / 3]

    with open(complete_root / 'summary.csv') as f:
        from_csv = {(row['method'], row['corruption']): float(row['accuracy']) for row in csv.DictReader(f)}
    from_json = {(row['method'], c): x['value'] for row in summary['rows']
                 for c, x in list(row['cells'].items()) + [('mean', row['mean'])]}
    assert from_csv == from_json and len(from_csv) == 8

    png = complete_root / 'summary.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(png) as img:
        assert img.info['Title'] == f'ImageNet-C: {complete_root.name}'
        img.verify()
    assert not [f for f in os.listdir(complete_root) if f.endswith('.tmp')]


def test_other_step_and_released_step_numbering(complete_root, tmp_path):
    released_ttt(complete_root / 'snow', [(0, 1.5), (1, 2.5)])  # the released line 0 is after 1 step
    released_baseline(complete_root / 'snow' / 'baseline', 1.0)
    r = collect(complete_root, '--step', 1, '--out', tmp_path / 'step1', '--title', 'Digits-C, severity 5')
    assert r.returncode == 0, r.stderr
    ttt = markdown_rows(r.stdout)[3]
    assert ttt == ['TTT-MAE (step 1)', '20.0', '7.5', '1.5\u2020', '44.5\u2020', '18.4']  # (20+7.5+1.5+44.5)/4
    summary = json.loads((tmp_path / 'step1.json').read_text())
    assert summary['curves']['snow']['steps'] == [0, 1, 2]
    assert summary['curves']['snow']['value'] == [1.0, 1.5, 2.5]  # step 0: the baseline's
    assert summary['mean_curve']['corruptions'] == ['gaussian_noise', 'shot_noise', 'snow', 'fog']
    with Image.open(tmp_path / 'step1.png') as img:
        assert img.info['Title'] == 'Digits-C, severity 5'
    assert not (complete_root / 'summary.json').exists()


def test_partial_and_missing_runs_are_flagged_not_averaged(complete_root):
    ttt_json(complete_root / 'impulse_noise', [1.0, 2.0, 41.25], n=412, expected=1000)
    baseline_json(complete_root / 'impulse_noise' / 'baseline', 1.0)
    baseline_json(complete_root / 'glass_blur' / 'baseline', 8.0)  # its TTT run is missing
    r = collect(complete_root)
    assert r.returncode == 0, r.stderr
    header, _, baseline, ttt = markdown_rows(r.stdout)
    assert header[1:-1] == ['gaussian_noise', 'shot_noise', 'impulse_noise', 'glass_blur', 'fog']
    assert baseline[-1] == f'{(10 + 4.75 + 1 + 8 + 40.5) / 5:.1f}'  # every baseline is there
    assert ttt[3:5] == ['41.2*', 'missing'] and ttt[-1] == 'n/a'
    assert '* partial: TTT-MAE (step 2), impulse_noise: 412/1000 images' in r.stdout

    # --allow_partial averages a partial run (flagged), but still never a missing one
    ttt_json(complete_root / 'glass_blur', [8.0, 9.0, 10.0])
    r = collect(complete_root, '--allow_partial')
    ttt = markdown_rows(r.stdout)[3]
    assert ttt[-1] == f'{(30.25 + 12.0 + 41.25 + 10.0 + 45.0) / 5:.1f}*'
    summary = json.loads((complete_root / 'summary.json').read_text())
    assert summary['rows'][1]['mean'] == {'value': (30.25 + 12.0 + 41.25 + 10.0 + 45.0) / 5, 'status': 'partial'}
    assert 'impulse_noise' not in summary['mean_curve']['corruptions']  # partial runs stay out of the mean curve
    r = collect(complete_root)
    assert markdown_rows(r.stdout)[3][-1] == 'n/a'


def test_our_accuracy_txt_of_an_unfinished_run_is_partial(complete_root):
    """Without results.json, the last line of our accuracy.txt says how far an unfinished run came."""
    released_ttt(complete_root / 'snow', [(0, 1.5), (1, 2.5)])
    with open(complete_root / 'snow' / 'accuracy.txt', 'a') as f:
        f.write('partial: 41 of 100 images\n')
    released_baseline(complete_root / 'snow' / 'baseline', 1.0)
    with open(complete_root / 'snow' / 'baseline' / 'accuracy.txt', 'a') as f:
        f.write('partial: 64 of 100 images\n')
    r = collect(complete_root)
    assert r.returncode == 0, r.stderr
    _, _, baseline, ttt = markdown_rows(r.stdout)
    assert (baseline[3], ttt[3], ttt[-1]) == ('1.0*\u2020', '2.5*\u2020', 'n/a')
    assert '* partial: TTT-MAE (step 2), snow: 41/100 images' in r.stdout
    assert '* partial: no adaptation, snow: 64/100 images' in r.stdout


def test_extra_corruptions_are_shown_but_not_averaged(complete_root):
    ttt_json(complete_root / 'saturate', [60.0, 61.0, 62.0])
    r = collect(complete_root)
    header, _, baseline, ttt = markdown_rows(r.stdout)
    assert header[-2:] == ['saturate', 'mean (3/15)']
    assert ttt[-2:] == ['62.0', '29.1'] and baseline[-2:] == ['missing', '18.4']


def test_the_sweeps_device_hours_are_summed_under_the_table(complete_root, tmp_path):
    for folder, seconds in (('gaussian_noise', 5400.), ('gaussian_noise/baseline', 360.), ('shot_noise', 1800.)):
        path = complete_root / folder / 'results.json'
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, 'device_seconds': seconds, 'device': 'NVIDIA H100 80GB HBM3'}))
    r = collect(complete_root, '--out', tmp_path / 's')
    assert ('device time: 2.1 device-hours (no adaptation 0.1, TTT-MAE 2) on NVIDIA H100 80GB HBM3; 3 runs record '
            'none') in r.stdout
    # per image: the timed runs' device-seconds over their images (shot_noise's baseline records none)
    cost = {row[0]: row[-1] for row in markdown_rows(r.stdout, 1)[2:]}
    assert cost == {'no adaptation': '3.6', 'TTT-MAE (step 2)': '36'}
    assert json.load(open(tmp_path / 's.json'))['cost']['total_device_hours'] == pytest.approx(7560 / 3600)


def test_folders_of_ones_own_are_columns_in_natural_order(tmp_path):
    """A dataset of one's own (docs/own_data.md): any folder holding a run is a column; with no ImageNet-C
    corruption among them the mean is over them all; beside corruptions it is over the corruptions only."""
    root = tmp_path / 'mine'
    for name, acc in (('site10', 30.0), ('night', 10.0), ('site2', 20.0)):
        ttt_json(root / name, [acc, acc + 1.0])
        baseline_json(root / name / 'baseline', acc)
    (root / 'logs').mkdir()
    r = collect(root, '--out', tmp_path / 'mine_summary')
    assert r.returncode == 0, r.stderr
    header, _, baseline, ttt = markdown_rows(r.stdout)
    assert header[1:] == ['night', 'site2', 'site10', 'mean of 3']  # site2 before site10
    assert ttt[1:] == ['11.0', '21.0', '31.0', '21.0'] and 'not run' not in r.stdout
    assert 'ignoring folders that hold no run: logs' in r.stderr
    ttt_json(root / 'fog', [50.0, 52.0])
    header, _, _, ttt = markdown_rows(collect(root, '--out', tmp_path / 'mixed').stdout)
    assert header[1:] == ['fog', 'night', 'site2', 'site10', 'mean (1/15)'] and ttt[-1] == '52.0'


@pytest.mark.parametrize('case', ['missing_root', 'no_corruptions', 'bad_json', 'wrong_method', 'bad_txt',
                                  'bad_partial_line', 'no_step'])
def test_bad_input_is_one_line_and_exit_2(case, complete_root, tmp_path):
    args = [complete_root]
    if case == 'missing_root':
        args = [tmp_path / 'nope']
    elif case == 'no_corruptions':
        (tmp_path / 'empty' / 'logs').mkdir(parents=True)
        args = [tmp_path / 'empty']
    elif case == 'bad_json':
        (complete_root / 'gaussian_noise' / 'results.json').write_text('{"method": "ttt", ')
    elif case == 'wrong_method':
        baseline_json(complete_root / 'gaussian_noise', 3.0)
    elif case == 'bad_txt':
        (complete_root / 'fog' / 'baseline' / 'accuracy.txt').write_text(ARGS_LINE)
    elif case == 'bad_partial_line':
        (complete_root / 'fog' / 'baseline' / 'accuracy.txt').write_text(ARGS_LINE + '40.5 3.25\npartial: 41\n')
    else:
        args += ['--step', 7]
    r = collect(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    if case in ('bad_json', 'wrong_method'):
        assert os.path.join('gaussian_noise', 'results.json') in lines[0]
    if case in ('bad_txt', 'bad_partial_line'):
        assert os.path.join('fog', 'baseline', 'accuracy.txt') in lines[0]


def test_error_rates_and_which_images(complete_root, tmp_path):
    """--metric error reports 100 - accuracy (as test-time-adaptation benchmarks do), and the table says
    which images each number comes from."""
    for f in ('gaussian_noise', 'gaussian_noise/baseline'):
        path = complete_root / f / 'results.json'
        record = json.loads(path.read_text())
        record['selection'] = {'images': 100, 'subset_file': '/lists/ids.txt', 'subset_file_sha256': 'ab' * 32}
        path.write_text(json.dumps(record))
    accuracy = collect(complete_root, '--out', tmp_path / 'acc')
    error = collect(complete_root, '--metric', 'error', '--out', tmp_path / 'err')
    assert accuracy.returncode == error.returncode == 0, error.stderr
    acc, err = (json.load(open(tmp_path / f'{name}.json')) for name in ('acc', 'err'))
    for a, e in zip(acc['rows'], err['rows']):
        assert e['mean']['value'] == pytest.approx(100 - a['mean']['value'])
        assert all(e['cells'][c]['value'] == pytest.approx(100 - a['cells'][c]['value']) for c in a['cells'])
    assert 'top-1 error (%) = 100 - accuracy' in error.stdout
    assert 'images: the 100 images listed in /lists/ids.txt (sha256 abababababab): gaussian_noise (ttt), ' \
           'gaussian_noise (baseline)' in error.stdout
    assert 'images: not recorded (a released accuracy.txt, or a results.json of an older version): ' \
           'shot_noise (ttt), shot_noise (baseline), fog (ttt), fog (baseline)' in error.stdout
    with open(tmp_path / 'err.csv') as f:
        assert 'error' in next(csv.reader(f))


PAPER = json.load(open(os.path.join(REPO, 'docs', 'results', 'references', 'paper.json')))


def test_the_paper_beside_the_users_numbers(complete_root, tmp_path):
    """--reference paper: the paper's rows under the table, each corruption's difference, and for a run of
    fewer images than the full set whether that difference is within 2 of its standard errors."""
    path = complete_root / 'gaussian_noise' / 'results.json'  # 100 images of a 5,000-image list
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, 'selection': {'images': 100, 'subset_file': '/ids.txt',
                                                         'subset_file_sha256': 'ab' * 32}}))
    (complete_root / 'gaussian_noise' / 'finetuned').mkdir()
    baseline_json(complete_root / 'gaussian_noise' / 'finetuned', 41.0)
    r = collect(complete_root, '--reference', 'paper', '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr
    rows = markdown_rows(r.stdout)
    labels = [row[0] for row in rows]
    assert labels == ['method', '---', 'no adaptation', 'fine-tune (MAE)', 'TTT-MAE (step 2)']
    paper = {row[0]: row for row in markdown_rows(r.stdout, 2)}
    assert paper['ViT Probe'][1:] == ['17.4', '18.2', '38.6']  # gaussian_noise, shot_noise, fog
    # ours - paper: TTT at step 2 on gaussian_noise is 30.25 vs 30.5; SE of 30.25% over 100 images is 4.6
    assert paper['TTT-MAE (step 2) - TTT-MAE'][1] == '-0.2 ok'
    assert paper['TTT-MAE (step 2) - TTT-MAE'][3] == f"{45.0 - 44.7:+.1f}"  # fog, a released run: no SE check
    summary = json.load(open(tmp_path / 's.json'))
    cell = next(row for row in summary['reference']['rows'] if row['label'] == 'TTT-MAE')['cells']['gaussian_noise']
    assert cell['se'] == pytest.approx(100 * (0.3025 * 0.6975 / 100) ** 0.5) and cell['within_2se']
    assert summary['reference']['source'].startswith('Gandelsman')


@pytest.mark.parametrize('reference, fragment', [
    ('table9', "unknown reference 'table9': neither a file nor one of paper"),
    ({'rows': {'Mine': {'method': 'ttt', 'values': {'gaussian_nois': 3}}}}, "row 'Mine' has corruptions that are not"),
    ({'rows': {'Mine': {'method': 'ttt', 'values': {'fog': 'high'}}}}, "row 'Mine' has values that are not numbers: fog"),
    ({'rows': {'Mine': {'values': {'fog': 3}}}}, "row 'Mine' needs 'method'"),
    ({'Mine': {'method': 'ttt', 'values': {'fog': 3}}}, "holds no rows: it must be a JSON object {'source': TEXT, 'rows'"),
    ([1, 2], 'holds no rows: it must be')])
def test_bad_references_are_one_line(complete_root, tmp_path, reference, fragment):
    if not isinstance(reference, str):
        (tmp_path / 'ref.json').write_text(json.dumps(reference))
        reference = str(tmp_path / 'ref.json')
    r = collect(complete_root, '--reference', reference)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr


def test_ablations_side_by_side_each_to_its_last_step(tmp_path):
    sgd, adam = tmp_path / 'sgd', tmp_path / 'adam'
    for c, accs in (('gaussian_noise', [10.0, 12.0, 14.0]), ('fog', [20.0, 22.0, 26.0])):
        ttt_json(sgd / c, accs)
        ttt_json(adam / c, accs[:1] + [15.0])  # one step only
    r = collect(sgd, adam, '--labels', 'SGD', 'Adam', '--out', tmp_path / 'cmp')
    assert r.returncode == 0, r.stderr
    rows = markdown_rows(r.stdout)
    assert rows[0] == ['run', 'corruptions', 'step 0', 'step 1', 'step 2']
    assert rows[2] == ['SGD', '2', '15.0', '17.0', '20.0'] and rows[3] == ['Adam', '2', '15.0', '15.0', '']
    comparison = json.load(open(tmp_path / 'cmp.json'))
    assert [c['steps'] for c in comparison['curves']] == [[0, 1, 2], [0, 1]]
    assert (tmp_path / 'cmp.png').read_bytes()[:4] == b'\x89PNG'
    r = collect(sgd, adam, '--labels', 'SGD')
    assert r.returncode == 2 and '--labels gives 1 names for 2 roots' in r.stderr


def finished_run(folder, correct, method='ttt', seconds=1., **args):
    """A finished run of ours: per_image.npz from correct (images, steps + 1) and its results.json."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    correct = np.asarray(correct, dtype=bool)
    labels = np.zeros(len(correct), dtype=np.int64)
    np.savez(folder / 'per_image.npz', index=np.arange(len(correct)), label=labels, pred=np.where(correct, 0, 1),
             filename=np.array([f'img_{i}.png' for i in range(len(correct))]))
    (folder / 'results.json').write_text(json.dumps({
        'method': method, 'accuracy_per_step': (100 * correct.mean(0)).tolist(), 'num_images': len(correct),
        'num_images_expected': len(correct), 'complete': True, 'device_seconds': seconds * len(correct),
        'online': 'online_window' in args, 'args': args}))


def test_every_method_at_its_cost_from_sibling_folders(tmp_path):
    """Methods beside TTT-MAE on the same images, in folders under each corruption's: a row per objective and
    rule, and each at its cost: paired gain over no adaptation with its SE, device-seconds per image."""
    import numpy as np
    rng = np.random.default_rng(0)
    root = tmp_path / 'sweep'
    before = {c: rng.random(40) < 0.3 for c in ('gaussian_noise', 'fog')}
    for c, b in before.items():
        finished_run(root / c / 'baseline', b[:, None], 'baseline', seconds=0.01)
        finished_run(root / c, np.stack([b, b | (rng.random(40) < 0.2), b | (rng.random(40) < 0.3)], 1), seconds=2.,
                     objective='mae', finetune_mode='encoder')
        finished_run(root / c / 'memo', np.stack([b, b ^ (rng.random(40) < 0.1)], 1), seconds=0.5,
                     objective='memo', finetune_mode='reached')
        finished_run(root / c / 'tent', np.stack([b, b], 1), seconds=0.02, objective='entropy', finetune_mode='norm')
        finished_run(root / c / 'cheap', np.stack([b, b, b | (rng.random(40) < 0.1)], 1), seconds=1.,
                     objective='mae', finetune_mode='last:2')
        finished_run(root / c / 'online', np.stack([b, b | (rng.random(40) < 0.1)], 1), seconds=0.1,
                     objective='mae', finetune_mode='all', online_window=16)
    r = collect(root, '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr
    assert [row[0] for row in markdown_rows(r.stdout)[2:]] == [
        'no adaptation', 'TTT-MAE (step 2)', 'MEMO (step 1)', 'TTT-MAE (last:2) (step 2)', 'entropy (step 1)',
        'online TTT-MAE (step 1)']
    summary = json.load(open(tmp_path / 's.json'))
    methods = {m['label']: m for m in summary['methods']}
    memo = methods['MEMO (step 1)']
    d = np.concatenate([(np.load(root / c / 'memo' / 'per_image.npz')['pred'][:, 1] == 0).astype(int) - before[c]
                        for c in ('gaussian_noise', 'fog')])
    paired = d.reshape(2, 40).mean(0)  # the same 40 file names in both corruptions: averaged per image
    assert memo['gain'] == pytest.approx(100 * paired.mean()) and memo['gain_paired']
    assert memo['gain_se'] == pytest.approx(100 * paired.std(ddof=1) / np.sqrt(40))
    assert memo['device_seconds_per_image'] == pytest.approx(0.5) and methods['entropy (step 1)']['gain'] == 0
    ttt = methods['TTT-MAE (step 2)']
    assert ttt['curve']['steps'] == [0, 1, 2] and ttt['curve']['device_seconds_per_image'] == pytest.approx([0, 1, 2])
    cost = {row[0]: row[1:] for row in markdown_rows(r.stdout, 1)[2:]}
    assert cost['no adaptation'] == [summary['rows'][0]['mean']['value'].__format__('.1f'), '', '0.01']
    assert cost['MEMO (step 1)'][1] == f"{memo['gain']:+.1f} ± {memo['gain_se']:.1f}"
    assert (tmp_path / 's_cost.png').read_bytes()[:4] == b'\x89PNG'


def test_runs_at_any_depth_are_columns_named_by_their_path(tmp_path):
    """make_imagenet_c.py's <corruption>/<severity>/ and one's own shifts, each run folder named by its path."""
    root = tmp_path / 'runs' / 'val'
    for name, acc in (('fog/5', 30.0), ('fog/3', 40.0), ('night', 10.0)):
        ttt_json(root / name, [acc, acc + 2.0])
        baseline_json(root / name / 'baseline', acc)
    r = collect(root, '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr
    header, _, baseline, ttt = markdown_rows(r.stdout)
    assert header[1:] == ['fog/3', 'fog/5', 'night', 'mean (1/15)'] and ttt[1:] == ['42.0', '32.0', '12.0', '37.0']
    assert 'the mean is over the standard corruptions only, not (night)' in r.stdout
    only = collect(root, '--columns', 'night', 'fog/5', '--out', tmp_path / 'o')
    assert markdown_rows(only.stdout)[0][1:] == ['night', 'fog/5', 'mean (1/15)']
    assert 'holds no run folder fog/1' in collect(root, '--columns', 'fog/1').stderr


def test_a_root_per_method_with_labels(tmp_path):
    import numpy as np
    rng = np.random.default_rng(1)
    for c in ('gaussian_noise', 'fog'):
        b = rng.random(20) < 0.4
        for method, root in (('mae', tmp_path / 'mae'), ('memo', tmp_path / 'memo')):
            finished_run(root / c / 'baseline', b[:, None], 'baseline', seconds=0.01)
            finished_run(root / c, np.stack([b, b | (rng.random(20) < 0.2)], 1), objective=method)
    r = collect(tmp_path / 'mae', tmp_path / 'memo', '--labels', 'TTT-MAE', 'MEMO', '--out', tmp_path / 'cmp')
    assert r.returncode == 0, r.stderr
    assert [row[0] for row in markdown_rows(r.stdout, 1)[2:]] == [
        'TTT-MAE: no adaptation', 'TTT-MAE: TTT-MAE (step 1)', 'MEMO: no adaptation', 'MEMO: MEMO (step 1)']
    assert (tmp_path / 'cmp_cost.png').exists()


def test_methods_read_in_their_own_folders_whatever_their_layout(tmp_path):
    """Folders of one method under two names make a row each; a run without adaptation below a column (another
    model) is a row of its own; a method run on other images than the baseline gets no paired gain (and the
    table still comes); a root given with a trailing slash reads as without."""
    import numpy as np
    rng = np.random.default_rng(2)
    root = tmp_path / 'sweep'
    for c in ('snow', 'fog'):  # fog last: its b is the one memo_a and few repeat
        b = rng.random(20) < 0.4
        finished_run(root / c / 'baseline', b[:, None], 'baseline')
        finished_run(root / c, np.stack([b, b], 1), objective='mae')
        finished_run(root / c / 'memo_b', np.stack([b, ~b], 1), objective='memo')
        finished_run(root / c / 'vit_b', (~b)[:, None], 'baseline')
    finished_run(root / 'fog' / 'memo_a', np.stack([b, b], 1), objective='memo')
    finished_run(root / 'fog' / 'few', np.stack([b[:5], b[:5]], 1), objective='entropy')  # 5 images of 20
    r = collect(str(root) + os.sep, '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row[1:] for row in markdown_rows(r.stdout)[2:]}
    assert set(rows) == {'no adaptation', 'TTT-MAE (step 1)', 'MEMO [memo_a] (step 1)', 'MEMO [memo_b] (step 1)',
                         'vit_b (step 0)', 'entropy (step 1)'}
    assert rows['MEMO [memo_a] (step 1)'][:2] == ['missing', rows['no adaptation'][1]]  # fog only, not snow's memo_b
    methods = {m['label']: m for m in json.load(open(tmp_path / 's.json'))['methods']}
    assert methods['entropy (step 1)'].get('gain') is None and methods['entropy (step 1)']['gain_columns'] == 0
    assert methods['vit_b (step 0)']['gain'] == pytest.approx(100 * (1 - 2 * 0.4), abs=30)  # ~b against b
    assert json.load(open(tmp_path / 's.json'))['curves']  # the root's own runs are its TTT-MAE rows


def test_the_paper_beside_severity_5_only(tmp_path):
    root = tmp_path / 'runs'
    for name in ('fog/5', 'fog/3'):
        ttt_json(root / name, [40.0, 44.0])
        baseline_json(root / name / 'baseline', 40.0)
    r = collect(root, '--reference', 'paper', '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr
    compared = json.load(open(tmp_path / 's.json'))['reference']['rows'][0]
    assert list(compared['values']) == ['fog/5']  # the paper's numbers are severity 5's
