"""engine_run.py's set-up: the combined model, the test folder's labels, what a rerun has left to do."""
import json

import pytest
import torch

from conftest import TINY, make_image_folder, tiny_model
from engine_run import build_test_model, images_left, set_precision
from main_test_time_training import get_args_parser
from util.datasets import load_test_set
from util.errors import UserError
from util.records import ResultStore


def args_for(checkpoints, data='unused', *extra):
    mae, probe = checkpoints
    return get_args_parser().parse_args(['--data_path', data, '--resume_model', mae, '--resume_finetune', probe,
                                         '--model', TINY, '--num_classes', '2', '--device', 'cpu', *extra])


def test_the_combined_model_is_the_mae_encoder_with_the_probe_head(checkpoints):
    model, _ = build_test_model(args_for(checkpoints), 'cpu')
    expected = tiny_model(num_classes=2).state_dict()  # the fixture checkpoints hold its weights
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_head_that_does_not_fit_names_the_keys(checkpoints):
    with pytest.raises(UserError, match=r'missing keys: classifier_blocks\.1\.'):
        build_test_model(args_for(checkpoints, 'unused', '--classifier_depth', '2'), 'cpu')
    with pytest.raises(UserError, match='no linear weights'):
        build_test_model(args_for(checkpoints, 'unused', '--head_type', 'linear'), 'cpu')


def test_test_folders_are_labelled_through_the_heads_classes(checkpoints, tmp_path):
    """A folder lacking a class keeps the labels of the others; one the head does not know is refused."""
    args = args_for(checkpoints, 'unused', '--dataset_name', 'folder')
    _, classes = build_test_model(args, 'cpu')
    assert classes == ['class_a', 'class_b']
    args.data_path = make_image_folder(tmp_path / 'only_b', ['class_b'], 2)
    assert {label for _, label in load_test_set(args, classes).samples} == {1}  # not renumbered to 0
    args.data_path = make_image_folder(tmp_path / 'extra', ['class_a', 'class_c', 'zebra'], 1)
    with pytest.raises(UserError, match="2 class folder.* not among the head's classes: class_c, zebra"):
        load_test_set(args, classes)
    args.dataset_name = 'imagenet_c'  # the released default needs the ImageNet head
    with pytest.raises(UserError, match='needs a head over the 1000 ImageNet classes'):
        load_test_set(args, classes)


def test_classes_file_and_probes_without_a_record(checkpoints, tmp_path):
    mae, probe = checkpoints
    bare = tmp_path / 'bare.pth'  # a probe written elsewhere: no class list
    torch.save({'model': torch.load(probe, weights_only=True)['model']}, bare)
    with pytest.raises(UserError, match='records no class names .* pass --classes FILE'):
        build_test_model(args_for((mae, str(bare)), 'unused'), 'cpu')
    names = tmp_path / 'classes.txt'
    names.write_text('cat\ndog\n')
    _, classes = build_test_model(args_for((mae, str(bare)), 'unused', '--classes', str(names)), 'cpu')
    assert classes == ['cat', 'dog']
    names.write_text('cat\ndog\nemu\n')
    with pytest.raises(UserError, match='lists 3 classes; the head has 2 outputs'):
        build_test_model(args_for((mae, str(bare)), 'unused', '--classes', str(names)), 'cpu')


def test_images_left_after_a_partial_and_a_complete_run(tmp_path):
    store = ResultStore(str(tmp_path))
    for i in (0, 3):
        store.add(index=i, label=0, pred=[0], ce_loss=[0.], mae_loss=[], seconds=0.)
    store.flush()
    assert images_left(store, [0, 1, 2, 3]) == [1, 2]
    (tmp_path / 'results.json').write_text(json.dumps({'complete': True}))
    assert images_left(store, [0, 3]) is None


def test_cuda_precision_is_tf32_as_released_unless_strict():
    set_precision('cuda', strict_fp32=False)  # sets the flags whether or not a GPU is there
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_precision('cuda', strict_fp32=True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # left on: the next test checks that conftest restores it


def test_no_test_leaks_tf32_into_the_next():
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default, restored after the test above
