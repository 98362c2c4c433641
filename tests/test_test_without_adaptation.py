"""test_without_adaptation.py run as a user does: released outputs, batch size, subsets, bad folders."""
import json
import os

import numpy as np
import pytest

from conftest import make_image_folder, run_inprocess
from test_main_test_time_training import per_image, script_args
from util.errors import UserError
from util.records import load_per_image


def baseline(checkpoints, data, out, *extra):
    return script_args('test_without_adaptation.py', checkpoints, data, out, *extra)


@pytest.fixture
def test_folder(tmp_path):
    return make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 5, seed=3)


def test_batches_give_the_predictions_of_one_at_a_time_and_the_released_files(checkpoints, test_folder, tmp_path):
    run_inprocess(baseline(checkpoints, test_folder, tmp_path / 'b1', '--batch_size', '1'))
    run_inprocess(baseline(checkpoints, test_folder, tmp_path / 'b7', '--batch_size', '7'))
    b1, b7 = per_image(tmp_path / 'b1'), per_image(tmp_path / 'b7')
    assert np.array_equal(b1['pred'], b7['pred'])
    np.testing.assert_allclose(b1['ce_loss'], b7['ce_loss'], rtol=1e-5)
    results = json.load(open(tmp_path / 'b7' / 'results.json'))
    assert results['method'] == 'baseline' and results['complete'] and results['num_images'] == 10
    acc, loss = map(float, open(tmp_path / 'b7' / 'accuracy.txt').read().splitlines()[1].split())
    assert (acc, loss) == (results['accuracy'], results['loss'])
    assert acc == 100 * (b7['pred'][:, 0] == b7['label']).mean()
    released = np.load(tmp_path / 'b7' / 'accuracy.npy')  # the released content: 0 or 100 per image, floats
    assert released.dtype == np.float64 and released.tolist() == (100. * (b7['pred'][:, 0] == b7['label'])).tolist()
    assert 0 < released.mean() < 100  # both values occur: the check above compares something


def test_max_examples_subset(checkpoints, test_folder, tmp_path):
    run_inprocess(baseline(checkpoints, test_folder, tmp_path / 's', '--max_examples', '4'))
    assert per_image(tmp_path / 's')['index'].tolist() == [0, 2, 5, 7]  # evenly spaced over both classes


def test_bad_folders(user_error, checkpoints, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    user_error(baseline(checkpoints, str(empty), tmp_path / 'o'), 'no class sub-folders')
    user_error(baseline(checkpoints, str(tmp_path / 'missing'), tmp_path / 'o'), 'not found')


def test_stopped_baseline_shows_partial_outputs_and_resumes_to_the_same_files(checkpoints, test_folder, tmp_path):
    out, full = tmp_path / 'out', tmp_path / 'full'
    command = baseline(checkpoints, test_folder, out, '--batch_size', '2')
    run_inprocess(command)
    out.rename(full)  # the same folder for both runs: the same args line
    bad = os.path.join(test_folder, 'class_b', 'img_001.png')  # image 6, in the fourth batch
    good = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    assert run_inprocess(command, check=False).returncode == 2

    results = json.load(open(out / 'results.json'))
    assert not results['complete'] and (results['num_images'], results['num_images_expected']) == (6, 10)
    assert open(out / 'accuracy.txt').read().splitlines()[-1] == 'partial: 6 of 10 images'
    assert not (out / 'accuracy.npy').exists()  # the released file has every image
    assert per_image(out)['index'].tolist() == list(range(6))
    with pytest.raises(UserError, match='unfinished run'):
        load_per_image(str(out))

    with open(bad, 'wb') as f:
        f.write(good)
    run_inprocess(command)
    for name in ('accuracy.txt', 'accuracy.npy'):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    a, b = per_image(out), per_image(full)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in b if k != 'seconds')
    assert json.load(open(out / 'results.json'))['complete']
