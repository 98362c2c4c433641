"""scripts/make_stream.py: several test sets one after another, and online TTT-MAE following that order."""
import os
import sys

import numpy as np
import pytest

from conftest import REPO, check_error_line, make_image_folder, run_inprocess
from test_main_test_time_training import per_image, script_args
from util.cli import run_main

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import make_stream  # noqa: E402


def stream(capsys, *argv):
    """make_stream.py's run in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_main(make_stream.main, make_stream.get_args_parser().parse_args(list(map(str, argv))))
        code = 0
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def two_sets(tmp_path):
    return [str(make_image_folder(tmp_path / 'c' / name / '5', ['class_a', 'class_b'], 3, seed=seed))
            for seed, name in enumerate(['fog', 'snow'])]


def test_sets_follow_one_another_each_shuffled_and_a_rerun_changes_nothing(capsys, tmp_path):
    sets, out = two_sets(tmp_path), tmp_path / 'stream'
    code, stdout, _ = stream(capsys, '--sets', *sets, '--output_dir', out)
    assert code == 0 and '12 images of 2 sets (fog-5, snow-5)' in stdout
    listed = (out / 'stream.txt').read_text().split()
    assert [r.split('/')[1].split('__')[0] for r in listed] == ['fog-5'] * 6 + ['snow-5'] * 6
    for relative in listed:  # each a link into its own set, under its class
        cls, name = relative.split('/')
        source = os.path.join(sets[name.startswith('snow')], cls, name.split('__')[1])
        assert os.path.islink(out / relative) and os.path.samefile(out / relative, source)
    assert listed[:6] != sorted(listed[:6])  # shuffled within the set (by --seed)
    assert stream(capsys, '--sets', *sets, '--output_dir', out)[0] == 0
    assert (out / 'stream.txt').read_text().split() == listed


@pytest.mark.parametrize('argv, fragments', [
    (['--seed', '1'], ['other arguments made']),
    (['--names', 'a'], ['1 names for 2 --sets']),
    (['--names', 'a', 'a'], ['the same name']),
])
def test_bad_arguments_are_one_line(capsys, tmp_path, argv, fragments):
    sets, out = two_sets(tmp_path), tmp_path / 'stream'
    assert stream(capsys, '--sets', *sets, '--output_dir', out)[0] == 0
    check_error_line(*stream(capsys, '--sets', *sets, '--output_dir', out, *argv), fragments)
    check_error_line(*stream(capsys, '--sets', sets[0], tmp_path / 'nope', '--output_dir', tmp_path / 'o'),
                     ['nope is not a folder'])


def test_an_online_run_follows_the_stream_in_its_listed_order(capsys, checkpoints, tmp_path):
    sets, out = two_sets(tmp_path), tmp_path / 'stream'
    assert stream(capsys, '--sets', *sets, '--output_dir', out, '--max_per_set', '4')[0] == 0
    listed = (out / 'stream.txt').read_text().split()
    run_inprocess(script_args('main_online_ttt.py', checkpoints, str(out), tmp_path / 'online', '--stream_order',
                              'listed', '--subset_file', str(out / 'stream.txt'), '--batch_size', '4', '--single_crop',
                              '--norm_pix_loss'))
    records = per_image(tmp_path / 'online')
    samples = sorted(f'{c}/{f}' for c in ('class_a', 'class_b') for f in os.listdir(out / c))  # the folder's order
    in_stream_order = [samples[i] for i in records['index'][np.argsort(records['position'])]]
    assert in_stream_order == listed and records['pred'].shape == (8, 2)  # the online default: one step


def test_frames_keep_their_time_order_in_the_stream_and_in_an_online_run(capsys, checkpoints, tmp_path):
    """Video frames: names compared with their numbers as numbers (frame_2 before frame_10), whatever the
    class folder; make_stream.py --within_set natural and main_online_ttt.py --stream_order natural agree."""
    from PIL import Image
    video = tmp_path / 'video'
    rng = np.random.default_rng(0)
    for t in (1, 2, 10, 11, 3):
        cls = 'class_a' if t < 10 else 'class_b'
        os.makedirs(video / cls, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(video / cls / f'frame_{t}.png')
    out = tmp_path / 'stream'
    assert stream(capsys, '--sets', video, '--names', 'v', '--within_set', 'natural', '--output_dir', out)[0] == 0
    frames = [r.split('__')[-1] for r in (out / 'stream.txt').read_text().split()]
    assert frames == ['frame_1.png', 'frame_2.png', 'frame_3.png', 'frame_10.png', 'frame_11.png']
    run_inprocess(script_args('main_online_ttt.py', checkpoints, str(video), tmp_path / 'online', '--stream_order',
                              'natural', '--batch_size', '4', '--single_crop', '--norm_pix_loss'))
    records = per_image(tmp_path / 'online')
    in_stream = [os.path.basename(f) for f in records['filename'][np.argsort(records['position'])]]
    assert in_stream == frames
