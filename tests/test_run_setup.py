"""util/run_setup.py: the combined model, the test folder's labels, what a rerun has left to do."""
import json

import pytest
import torch

from conftest import TINY, make_image_folder, tiny_model
from main_test_time_training import get_args_parser
from util.cli import UserError
from util.results import ResultStore
from util.run_setup import build_test_model, images_to_do, load_test_set, run_config


def args_for(checkpoints, data='unused', *extra):
    mae, probe = checkpoints
    return get_args_parser().parse_args(['--data_path', data, '--resume_model', mae, '--resume_finetune', probe,
                                         '--model', TINY, '--num_classes', '2', '--device', 'cpu', *extra])


def test_the_combined_model_is_the_mae_encoder_with_the_probe_head(checkpoints):
    model = build_test_model(args_for(checkpoints), 'cpu')
    expected = tiny_model(num_classes=2).state_dict()  # the fixture checkpoints hold its weights
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_head_that_does_not_fit_names_the_keys(checkpoints):
    with pytest.raises(UserError, match=r'missing keys: classifier_blocks\.1\.'):
        build_test_model(args_for(checkpoints, 'unused', '--classifier_depth', '2'), 'cpu')
    with pytest.raises(UserError, match='no linear weights'):
        build_test_model(args_for(checkpoints, 'unused', '--head_type', 'linear'), 'cpu')


def test_labels_must_fit_the_head(checkpoints, tmp_path):
    data = make_image_folder(tmp_path / 'd', ['a', 'b', 'c'], 1)
    with pytest.raises(UserError, match='label 2 .* does not fit --num_classes 2'):
        load_test_set(args_for(checkpoints, data, '--dataset_name', 'folder'))
    with pytest.raises(UserError, match='not ImageNet wnids'):
        load_test_set(args_for(checkpoints, data))  # imagenet_c, the released default, needs wnids


def test_images_to_do_after_a_partial_and_a_complete_run(tmp_path):
    store = ResultStore(str(tmp_path))
    for i in (0, 3):
        store.add(index=i, label=0, pred=[0], ce_loss=[0.], mae_loss=[], seconds=0.)
    store.flush()
    assert images_to_do(store, [0, 1, 2, 3]) == [1, 2]
    (tmp_path / 'results.json').write_text(json.dumps({'complete': True}))
    assert images_to_do(store, [0, 3]) is None


def test_run_config_keeps_what_results_depend_on(checkpoints):
    config = run_config(args_for(checkpoints, 'some/folder', '--num_workers', '3', '--print_freq', '7'))
    assert config['resume_model'] == 'mae.pth' and config['steps_per_example'] == 20
    assert config['device_type'] == 'cpu' and config['data'].endswith('some/folder')
    assert not {'num_workers', 'print_freq', 'output_dir', 'world_size'} & set(config)
