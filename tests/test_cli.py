"""util/cli.py and bad input to every script: exit code 2 and one 'error:' line naming the problem,
before any work is done.

A few cases run the scripts as a user does (a subprocess each); the rest call the same entry point,
run_main(main, args), or the script's parser, in this process, which is much faster and checks the same
exit code and stderr.
"""
import argparse
import hashlib
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, check_error_line, make_image_folder, run_script, tiny_model
from models_mae import build_model
from util.errors import UserError

SCRIPTS = ('main_pretrain', 'main_prob', 'main_test_time_training', 'main_online_ttt', 'test_without_adaptation')
REQUIRED = {'main_pretrain': ['--data_path', 'd'], 'main_prob': ['--data_path', 'd'],
            'main_test_time_training': ['--data_path', 'd', '--resume_model', 'm', '--resume_finetune', 'p'],
            'main_online_ttt': ['--data_path', 'd', '--resume_model', 'm', '--resume_finetune', 'p'],
            'test_without_adaptation': ['--data_path', 'd', '--resume_model', 'm', '--resume_finetune', 'p']}


def parse_error(capsys, script, *argv):
    """The one line a script's parser prints for argv (after its required flags), exit status 2."""
    parser = importlib.import_module(script).get_args_parser()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(REQUIRED[script] + list(argv))
    out, err = capsys.readouterr()
    return check_error_line(e.value.code, out, err, [])


@pytest.mark.parametrize('script, argv, fragment', [
    ('main_test_time_training', ['--parallel_images', '0'], '--parallel_images: must be >= 1, got 0'),
    ('main_test_time_training', ['--parallel_images', '-2'], '--parallel_images: must be >= 1, got -2'),
    ('main_test_time_training', ['--steps_per_example', '-1'], '--steps_per_example: must be >= 0'),
    ('main_test_time_training', ['--mask_ratio', '1'], '--mask_ratio: must be > 0 and < 1, got 1'),
    ('main_test_time_training', ['--optimizer_momentum', '1.5'], '--optimizer_momentum'),
    ('main_test_time_training', ['--blr', 'nan'], "--blr: expected a finite number, got 'nan'"),
    ('main_test_time_training', ['--lr', 'inf'], "--lr: expected a finite number, got 'inf'"),
    ('main_test_time_training', ['--flush_every', '0'], '--flush_every'),
    ('main_test_time_training', ['--max_examples', '0'], '--max_examples'),
    ('main_test_time_training', ['--optimizer_type', 'lamb'], "invalid choice: 'lamb'"),
    ('main_test_time_training', ['--steps_per_example', 'ten'], "expected a whole number, got 'ten'"),
    ('main_test_time_training', ['--online'], 'online TTT-MAE has its own script: python main_online_ttt.py'),
    ('main_test_time_training', ['--online_window', '2'], 'unrecognized arguments: --online_window'),
    ('main_online_ttt', ['--encoder_lr_scale', '0'], '--encoder_lr_scale: must be > 0, got 0'),
    ('main_online_ttt', ['--clip_grad', '-1'], '--clip_grad: must be >= 0, got -1'),
    ('main_online_ttt', ['--online_ema', '1'], '--online_ema: must be >= 0 and < 1, got 1'),
    ('main_online_ttt', ['--parallel_images', '2'], 'unrecognized arguments: --parallel_images'),
    ('main_online_ttt', ['--blr', '0.5'], 'unrecognized arguments: --blr'),
    ('test_without_adaptation', ['--batch_size', '0'], '--batch_size: must be >= 1, got 0'),
    ('main_pretrain', ['--batch_size', '0'], '--batch_size: must be >= 1, got 0'),
    ('main_pretrain', ['--epochs', '0'], '--epochs: must be >= 1, got 0'),
    ('main_pretrain', ['--head_type', 'linear'], 'unrecognized arguments: --head_type'),
    ('main_pretrain', ['--mask_ratio', '0'], '--mask_ratio'),
    ('main_prob', ['--epochs', '0'], '--epochs: must be >= 1, got 0'),
    ('main_prob', ['--smoothing', '1'], '--smoothing'),
    ('main_prob', ['--seed', '-1'], '--seed: must be >= 0'),
])
def test_bad_flags_are_one_line_before_any_work(capsys, script, argv, fragment):
    line = parse_error(capsys, script, *argv)
    assert fragment in line and f'see {script}.py --help' in line


def test_the_papers_script_shows_the_released_defaults_literally():
    """--help shows each default as it is (the lr: its released rule), and no default depends on another flag."""
    from main_test_time_training import get_args_parser
    parser = get_args_parser()
    # the released scripts' other flags, plugins and other methods: groups of their own, outside the budget
    outside = {a for g in parser._action_groups if g.title in ('released flags', 'beyond the paper') for a in g._group_actions}
    shown = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and a not in outside]
    assert len(shown) - 1 <= 45  # flags besides -h
    defaults = {a.dest: a.default for a in shown}
    assert {k: defaults[k] for k in ('steps_per_example', 'finetune_mode', 'optimizer_type', 'weight_decay', 'blr',
                                  'batch_size', 'mask_ratio', 'optimizer_momentum')} == \
        {'steps_per_example': 20, 'finetune_mode': 'encoder', 'optimizer_type': 'sgd', 'weight_decay': 0.01,
         'blr': 1e-2, 'batch_size': 128, 'mask_ratio': 0.75, 'optimizer_momentum': 0.9}
    args = parser.parse_args(REQUIRED['main_test_time_training'])
    assert args.lr == 1e-2 * 128 / 256  # the released command's lr: blr * views per step / 256
    assert parser.parse_args(REQUIRED['main_test_time_training'] + ['--accum_iter', '2']).lr == 1e-2 * 256 / 256
    unset = [a.dest for a in shown if a.default is None and not a.required]  # each 'None: ...' in its help
    assert unset == ['lr', 'stop_rule', 'input_size', 'classifier_depth', 'resume_model', 'classes', 'max_examples',
                     'subset_file', 'log_dir', 'world_size']


def without_device(command):
    i = command.index('--device')
    return command[:i] + command[i + 2:]


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_the_default_device_is_cuda_and_without_a_gpu_one_line_says_to_pass_cpu(user_error, checkpoints,
                                                                                  image_folder, tmp_path):
    mae, probe_ckpt = checkpoints
    test_time = ['--data_path', f'{image_folder}/val', '--model', TINY, '--resume_model', mae, '--resume_finetune',
                 probe_ckpt, '--num_classes', '2', '--dataset_name', 'folder', '--num_workers', '0', '--output_dir']
    commands = [pretrain(image_folder, tmp_path / 'a'), probe(image_folder, tmp_path / 'b'),
                [sys.executable, 'main_test_time_training.py', *test_time, str(tmp_path / 'c'), '--device', 'cpu'],
                [sys.executable, 'test_without_adaptation.py', *test_time, str(tmp_path / 'd'), '--device', 'cpu']]
    fragment = '--device cuda: this machine has no usable CUDA GPU; pass --device cpu to run on the CPU'
    for command in commands:
        user_error(without_device(command), fragment)
    result = run_script(without_device(commands[0]), check=False)  # as a user runs it
    check_error_line(result.returncode, result.stdout, result.stderr, [fragment])


def test_unknown_device(capsys):
    assert "unknown device 'gpu'" in parse_error(capsys, 'main_prob', '--device', 'gpu')


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_shows_every_default_and_explains_every_flag(script):
    parser = importlib.import_module(script).get_args_parser()
    for action in parser._actions:
        if action.dest != 'help':
            assert action.help, action.dest
    text = parser.format_help()
    assert '(default: ' in text
    if script == 'main_test_time_training':
        assert '(default: 128)' in text and 'encoder = everything but the decoder' in text


def test_output_dir_that_is_a_file_or_cannot_be_made(user_error, checkpoints, image_folder, tmp_path):
    taken = tmp_path / 'taken'
    taken.write_text('a file')
    mae, probe = checkpoints
    ttt = [sys.executable, 'main_test_time_training.py', '--data_path', f'{image_folder}/val', '--model', TINY,
           '--resume_model', mae, '--resume_finetune', probe, '--num_classes', '2', '--dataset_name', 'folder',
           '--num_workers', '0', '--device', 'cpu', '--output_dir']
    user_error(ttt + [str(taken)], f'--output_dir {taken} is a file, not a folder')
    user_error(ttt + [str(taken / 'sub')], f'cannot create --output_dir {taken / "sub"}: Not a directory')
    user_error(pretrain(image_folder, taken), 'is a file, not a folder')
    assert taken.read_text() == 'a file'


def test_world_size_that_disagrees_with_the_launcher(user_error, image_folder, tmp_path):
    user_error(pretrain(image_folder, tmp_path / 'out', '--world_size', '8'), '--world_size 8, but 1 process')


def pretrain(data, out, *extra):
    return [sys.executable, 'main_pretrain.py', '--data_path', str(data), '--model', TINY, '--batch_size', '4',
            '--epochs', '1', '--num_workers', '0', '--device', 'cpu', '--output_dir', str(out), *extra]


def probe(data, out, *extra):
    return [sys.executable, 'main_prob.py', '--data_path', str(data), '--model', TINY, '--batch_size', '4',
            '--epochs', '1', '--num_classes', '2', '--num_workers', '0', '--device', 'cpu', '--output_dir',
            str(out), *extra]


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


def test_crop_scale_out_of_range(capsys):
    assert '--min_crop_scale: must be > 0 and <= 1, got 0' in parse_error(capsys, 'main_pretrain',
                                                                          '--min_crop_scale', '0')
    assert '--min_crop_scale: must be > 0 and <= 1, got 1.5' in parse_error(capsys, 'main_prob',
                                                                            '--min_crop_scale', '1.5')


# every flag of the released scripts, with a value (issue: their commands and users' sweeps pass them)
RELEASED_FLAGS = {
    'test_without_adaptation': ['--seed', '3', '--norm_pix_loss', '--load_optimizer', '--load_loss_scalar',
                                '--predict_rotations'],
    'main_test_time_training': ['--dist_on_itp', '--load_loss_scalar'],
    'main_prob': ['--mixup', '0.8', '--cutmix', '1.0', '--cutmix_minmax', '0.2', '0.8', '--mixup_prob', '1.0',
                  '--mixup_switch_prob', '0.5', '--mixup_mode', 'batch', '--reprob', '0.25', '--remode', 'pixel',
                  '--recount', '1', '--resplit', '--dist_on_itp'],
    'main_pretrain': ['--break_after_epoch', '5', '--dist_on_itp', '--classifier_depth', '12'],
}


@pytest.mark.parametrize('script', RELEASED_FLAGS)
def test_every_flag_of_the_released_scripts_is_accepted(capsys, script):
    """Each in the help's 'released flags' group (outside the paper's flags), with its effect or a line saying it
    has none; those without an effect are left out of the run's settings."""
    module = importlib.import_module(script)
    parser = module.get_args_parser()
    group = next(g for g in parser._action_groups if g.title == 'released flags')
    released = {o for a in group._group_actions for o in a.option_strings}
    assert {f for f in RELEASED_FLAGS[script] if f.startswith('--')} - {'--classifier_depth'} <= released
    capsys.readouterr()
    args = parser.parse_args(REQUIRED[script] + RELEASED_FLAGS[script])
    notes = capsys.readouterr().out.splitlines()
    no_effect = [f for f in RELEASED_FLAGS[script] if f.startswith('--') and f != '--dist_on_itp'
                 and f != '--classifier_depth']
    assert [n.split()[1] for n in notes] == no_effect and all('has no effect here: ' in n for n in notes)
    for flag in no_effect:
        assert not hasattr(args, flag[2:])  # nothing it changes: not recorded
    if '--dist_on_itp' in RELEASED_FLAGS[script]:
        assert args.dist_on_itp


def test_the_released_stored_latents_is_refused_saying_why(capsys):
    line = parse_error(capsys, 'main_test_time_training', '--stored_latents', 'latents.npy')
    assert 'skipped the per-image reset of the weights' in line and 'not reproduced' in line


def test_dist_on_itp_takes_the_ranks_openmpi_sets(user_error, checkpoints, image_folder, tmp_path, monkeypatch):
    mae, probe = checkpoints
    command = [sys.executable, 'test_without_adaptation.py', '--data_path', f'{image_folder}/val', '--model', TINY,
               '--resume_model', mae, '--resume_finetune', probe, '--num_classes', '2', '--dataset_name', 'folder',
               '--num_workers', '0', '--device', 'cpu', '--output_dir', str(tmp_path / 'o')]
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)
    user_error(command[:1] + ['main_test_time_training.py'] + command[2:] + ['--dist_on_itp'],
               '--dist_on_itp takes the ranks OpenMPI sets, and OMPI_COMM_WORLD_RANK')
    monkeypatch.setenv('OMPI_COMM_WORLD_RANK', '0')
    monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '1')
    monkeypatch.setenv('OMPI_COMM_WORLD_LOCAL_RANK', '0')
    module = importlib.import_module('main_test_time_training')
    args = module.get_args_parser().parse_args(command[2:] + ['--dist_on_itp', '--steps_per_example', '0'])
    from util.distributed import init_distributed_mode
    init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)  # set from OpenMPI's for the launch: gone with the test
