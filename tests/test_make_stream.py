"""scripts/make_stream.py: several test sets one after another, and online TTT-MAE following that order."""
import os
import sys

import numpy as np

from conftest import check_error_line, make_image_folder, run_inprocess, run_script
from test_main_test_time_training import per_image, script_args

STREAM = [sys.executable, 'scripts/make_stream.py']


def two_sets(tmp_path):
    return [str(make_image_folder(tmp_path / 'c' / name / '5', ['class_a', 'class_b'], 3, seed=seed))
            for seed, name in enumerate(['fog', 'snow'])]


def test_sets_follow_one_another_each_shuffled_and_a_rerun_changes_nothing(tmp_path):
    sets, out = two_sets(tmp_path), tmp_path / 'stream'
    first = run_script(STREAM + ['--sets', *sets, '--output_dir', str(out)])
    assert '12 images of 2 sets (fog-5, snow-5)' in first.stdout
    listed = (out / 'stream.txt').read_text().split()
    assert [r.split('/')[1].split('__')[0] for r in listed] == ['fog-5'] * 6 + ['snow-5'] * 6
    for relative in listed:  # each a link into its own set, under its class
        cls, name = relative.split('/')
        source = os.path.join(sets[name.startswith('snow')], cls, name.split('__')[1])
        assert os.path.islink(out / relative) and os.path.samefile(out / relative, source)
    assert listed[:6] != sorted(listed[:6])  # shuffled within the set (by --seed)
    run_script(STREAM + ['--sets', *sets, '--output_dir', str(out)])
    assert (out / 'stream.txt').read_text().split() == listed
    other = run_script(STREAM + ['--sets', *sets, '--output_dir', str(out), '--seed', '1'], check=False)
    check_error_line(other.returncode, other.stdout, other.stderr, ['other arguments made'])
    missing = run_script(STREAM + ['--sets', sets[0], str(tmp_path / 'nope'), '--output_dir', str(tmp_path / 'o')],
                         check=False)
    check_error_line(missing.returncode, missing.stdout, missing.stderr, ['nope is not a folder'])
    same = run_script(STREAM + ['--sets', sets[0], sets[0], '--output_dir', str(tmp_path / 'o')], check=False)
    check_error_line(same.returncode, same.stdout, same.stderr, ['the same name', '--names'])


def test_an_online_run_follows_the_stream_in_its_listed_order(checkpoints, tmp_path):
    sets, out = two_sets(tmp_path), tmp_path / 'stream'
    run_script(STREAM + ['--sets', *sets, '--output_dir', str(out), '--max_per_set', '4'])
    listed = (out / 'stream.txt').read_text().split()
    run_inprocess(script_args('main_test_time_training.py', checkpoints, str(out), tmp_path / 'online', '--online',
                              '--subset_file', str(out / 'stream.txt'), '--batch_size', '4', '--single_crop',
                              '--norm_pix_loss'))
    records = per_image(tmp_path / 'online')
    samples = sorted(f'{c}/{f}' for c in ('class_a', 'class_b') for f in os.listdir(out / c))  # the folder's order
    in_stream_order = [samples[i] for i in records['index'][np.argsort(records['position'])]]
    assert in_stream_order == listed and records['pred'].shape == (8, 2)  # the online default: one step
