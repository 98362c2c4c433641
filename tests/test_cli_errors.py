"""Bad input to main_pretrain.py and main_prob.py: exit code 2 and one 'error:' line naming the problem.

A few cases run the scripts as a user does (a subprocess each); the rest call the same entry point,
run_main(main, args), in this process, which is much faster and checks the same exit code and stderr.
"""
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, check_error_line, make_image_folder, run_script, tiny_model
from models_mae import build_model


def pretrain(data, out, *extra):
    return [sys.executable, 'main_pretrain.py', '--data_path', str(data), '--model', TINY, '--batch_size', '4',
            '--epochs', '1', '--num_workers', '0', '--output_dir', str(out), *extra]


def probe(data, out, *extra):
    return [sys.executable, 'main_prob.py', '--data_path', str(data), '--model', TINY, '--batch_size', '4',
            '--epochs', '1', '--num_classes', '2', '--num_workers', '0', '--output_dir', str(out), *extra]


def with_option(command, flag, value):
    """command with flag's value replaced (or the flag appended)."""
    command = list(command)
    if flag in command:
        command[command.index(flag) + 1] = value
    else:
        command += [flag, value]
    return command


def assert_user_error(command, *fragments):
    """Run the script in a subprocess."""
    result = run_script(command, check=False)
    return check_error_line(result.returncode, result.stdout, result.stderr, fragments)


@pytest.fixture
def data_copy(image_folder, tmp_path):
    return shutil.copytree(image_folder, tmp_path / 'data')


def test_missing_data_path(tmp_path):
    assert_user_error(pretrain(tmp_path / 'no_such_folder', tmp_path / 'out'), str(tmp_path / 'no_such_folder'),
                      'not found')


def test_empty_data_path(user_error, tmp_path):
    (tmp_path / 'empty').mkdir()
    user_error(pretrain(tmp_path / 'empty', tmp_path / 'out'), str(tmp_path / 'empty' / 'train'))


def test_no_class_folders(user_error, image_folder, tmp_path):
    flat = tmp_path / 'flat' / 'train'
    flat.mkdir(parents=True)
    for i, src in enumerate(sorted((Path(image_folder) / 'train' / 'class_a').iterdir())):
        shutil.copy(src, flat / f'{i}.png')
    user_error(pretrain(tmp_path / 'flat', tmp_path / 'out'), 'no class sub-folders', str(flat))


def test_class_folders_without_images(user_error, tmp_path):
    (tmp_path / 'd' / 'train' / 'cat').mkdir(parents=True)
    (tmp_path / 'd' / 'train' / 'cat' / 'notes.txt').write_text('no images here')
    user_error(pretrain(tmp_path / 'd', tmp_path / 'out'), 'cat', str(tmp_path / 'd' / 'train'))


@pytest.mark.parametrize('workers', ['0', '2'])
def test_truncated_image_is_named(data_copy, tmp_path, workers):
    bad = data_copy / 'train' / 'class_b' / 'img_005.png'
    bad.write_bytes(bad.read_bytes()[:100])
    line = assert_user_error(with_option(pretrain(data_copy, tmp_path / 'out'), '--num_workers', workers),
                             str(bad), 'cannot read image')
    assert 'truncated' in line


@pytest.mark.parametrize('workers', ['0', '2'])
def test_unreadable_validation_image_is_named(user_error, data_copy, checkpoints, tmp_path, workers):
    bad = data_copy / 'val' / 'class_a' / 'img_003.png'
    bad.write_text('not an image')
    command = with_option(probe(data_copy, tmp_path / 'out', '--finetune', checkpoints[0]), '--num_workers', workers)
    # DataLoader workers forked from pytest (threads and all) can hang at shutdown: a subprocess for those
    (assert_user_error if workers != '0' else user_error)(command, str(bad), 'cannot read image')


def test_missing_finetune_checkpoint(user_error, image_folder, tmp_path):
    missing = str(tmp_path / 'missing.pth')
    user_error(probe(image_folder, tmp_path / 'out', '--finetune', missing), missing, '--finetune')


def test_finetune_checkpoint_with_foreign_keys(user_error, image_folder, tmp_path):
    state = {'module.' + k: v for k, v in tiny_model().state_dict().items()}  # saved from a DDP wrapper
    torch.save({'model': state}, tmp_path / 'ddp.pth')
    user_error(probe(image_folder, tmp_path / 'out', '--finetune', str(tmp_path / 'ddp.pth')),
                      'ddp.pth', 'unexpected keys', 'module.blocks.0.attn.proj.bias')


def test_finetune_checkpoint_of_another_size(user_error, image_folder, tmp_path):
    torch.save({'model': build_model('mae_vit_tiny_patch4').state_dict()}, tmp_path / 'tiny.pth')
    user_error(probe(image_folder, tmp_path / 'out', '--finetune', str(tmp_path / 'tiny.pth')),
                      'tiny.pth', 'shape mismatch', 'blocks.0.attn.qkv.weight')


def test_resume_checkpoint_that_does_not_fit(user_error, image_folder, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    state = dict(tiny_model().state_dict())
    state['extra.weight'] = state.pop('norm.weight')
    torch.save({'model': state}, out / 'checkpoint-3.pth')
    user_error(pretrain(image_folder, out, '--epochs', '5'), 'checkpoint-3.pth',
                      'missing keys: norm.weight', 'unexpected keys: extra.weight')


def test_unknown_model(user_error, image_folder, tmp_path):
    line = assert_user_error(with_option(pretrain(image_folder, tmp_path / 'out'), '--model', 'mae_vit_giant'),
                             'mae_vit_giant', 'mae_vit_large_patch16', 'mae_vit_base_patch16', TINY)
    assert 'choices' in line
    user_error(with_option(probe(image_folder, tmp_path / 'out2'), '--model', 'vit_l'),
                      'vit_l', 'mae_vit_huge_patch14')


def test_too_few_classes_for_the_labels(user_error, image_folder, checkpoints, tmp_path):
    user_error(with_option(probe(image_folder, tmp_path / 'out', '--finetune', checkpoints[0]),
                                  '--num_classes', '1'), '--num_classes 1')


def test_too_few_images_for_a_batch(user_error, tmp_path):
    make_image_folder(tmp_path / 'd' / 'train', ['a'], 3)
    user_error(pretrain(tmp_path / 'd', tmp_path / 'out'), 'fewer than one batch')


def test_non_finite_loss_stops_and_keeps_the_checkpoint(image_folder, tmp_path):
    out = tmp_path / 'out'
    first = run_script(pretrain(image_folder, out, '--save_ckpt_freq', '1'))
    assert 'Epoch: [0]' in first.stdout
    ckpt = out / 'checkpoint-0.pth'
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    log = (out / 'log.txt').read_text()
    blowup = with_option(pretrain(image_folder, out, '--save_ckpt_freq', '1', '--lr', '1e30'), '--epochs', '2')
    line = assert_user_error(blowup, 'at epoch 1, iteration', str(out))
    assert 'loss is nan' in line or 'loss is inf' in line
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert (out / 'log.txt').read_text() == log
    assert not (out / 'checkpoint-1.pth').exists()


def test_crop_scale_out_of_range(user_error, image_folder, tmp_path):
    user_error(pretrain(image_folder, tmp_path / 'out', '--min_crop_scale', '0'), '--min_crop_scale', '0.0')
    user_error(probe(image_folder, tmp_path / 'out2', '--min_crop_scale', '1.5'), '--min_crop_scale', '1.5')
