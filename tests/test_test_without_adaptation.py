"""test_without_adaptation.py run as a user does: released outputs, batch size, subsets, bad folders."""
import json

import numpy as np
import pytest

from conftest import make_image_folder, run_inprocess
from test_main_test_time_training import per_image, script_args


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
    assert np.load(tmp_path / 'b7' / 'accuracy.npy').tolist() == (b7['pred'][:, 0] == b7['label']).tolist()


def test_max_examples_subset(checkpoints, test_folder, tmp_path):
    run_inprocess(baseline(checkpoints, test_folder, tmp_path / 's', '--max_examples', '4'))
    assert per_image(tmp_path / 's')['index'].tolist() == [0, 2, 5, 7]  # evenly spaced over both classes


def test_bad_folders(user_error, checkpoints, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    user_error(baseline(checkpoints, str(empty), tmp_path / 'o'), 'no class sub-folders')
    user_error(baseline(checkpoints, str(tmp_path / 'missing'), tmp_path / 'o'), 'not found')
