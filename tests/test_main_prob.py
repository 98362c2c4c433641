"""main_prob.py run as a user does: probing a frozen encoder, logs, checkpoints, automatic resume."""
import json
import os
import shutil
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run_inprocess, run_script
from util.pos_embed import get_2d_sincos_pos_embed

# color_folder rather than image_folder: its classes differ by a quadrant that the training
# transform's horizontal flip swaps, so no probe can beat chance there.
VIT_EPOCHS = 4


def probe_command(data, finetune, out, *extra):
    return [sys.executable, 'main_prob.py', '--data_path', data, '--model', TINY, '--num_classes', '2',
            '--finetune', finetune, '--warmup_epochs', '1', '--blr', '0.2', '--num_workers', '0', '--device', 'cpu',
            '--output_dir', str(out), *extra]


def log_records(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def vit_probe(color_folder, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp('probe')
    command = probe_command(color_folder, checkpoints[0], out, '--batch_size', '8', '--epochs', str(VIT_EPOCHS),
                            '--keep_last', '0')
    return out, command, run_script(command)


def test_vit_head_probe_learns(vit_probe):
    out, _, result = vit_probe
    records = log_records(out)
    assert [r['epoch'] for r in records] == list(range(VIT_EPOCHS))
    for r in records:
        assert {'test_acc1', 'test_acc5', 'test_loss', 'train_loss', 'train_lr'} <= set(r)
        assert 0 <= r['test_acc1'] <= 100 and r['test_acc5'] == 100  # 2 classes: top-5 holds both
    assert records[-1]['test_acc1'] >= 90, records
    assert 'Accuracy on 16 validation images' in result.stdout


def test_vit_head_probe_outputs(vit_probe, checkpoints):
    out, _, _ = vit_probe
    names = set(os.listdir(out))
    assert {f'checkpoint-{e}.pth' for e in range(VIT_EPOCHS)} | {'checkpoint-final.pth'} <= names
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert {'perf/test_acc1', 'perf/test_acc5', 'perf/test_loss', 'loss', 'lr'} <= set(acc.Tags()['scalars'])
    acc1 = acc.Scalars('perf/test_acc1')
    assert [e.step for e in acc1] == list(range(VIT_EPOCHS))
    assert [e.value for e in acc1] == pytest.approx([r['test_acc1'] for r in log_records(out)])
    # only the head trains: the encoder is the --finetune checkpoint's, bit for bit
    mae = load(checkpoints[0])['model']
    final = load(out / 'checkpoint-final.pth')
    assert final['epoch'] == VIT_EPOCHS - 1
    state = final['model']
    assert not any(k.startswith(('decoder', 'mask_token')) for k in state)
    for k, v in state.items():
        if not k.startswith('classifier'):
            assert torch.equal(v, mae[k]), f'{k} changed during probing'
    first = load(out / 'checkpoint-0.pth')['model']
    assert not torch.equal(first['classifier_pred.weight'], state['classifier_pred.weight'])
    # the head's position table is fixed sin-cos, as in the released probe (requires_grad False)
    table = torch.from_numpy(get_2d_sincos_pos_embed(16, 4, cls_token=True)).float()
    assert torch.equal(state['classifier_pos_embed'][0], table)


def test_rerun_resumes_and_redoes_nothing(vit_probe):
    out, command, _ = vit_probe
    before = (out / 'log.txt').read_text()
    final = (out / 'checkpoint-final.pth').read_bytes()
    again = run_inprocess(command)
    assert f'Resumed from {out}/checkpoint-{VIT_EPOCHS - 1}.pth (next epoch {VIT_EPOCHS})' in again.stdout
    assert 'Epoch: [' not in again.stdout
    assert (out / 'log.txt').read_text() == before
    assert (out / 'checkpoint-final.pth').read_bytes() == final


def test_only_the_newest_checkpoints_are_kept_and_a_rerun_resumes_from_them(color_folder, checkpoints, tmp_path):
    out = tmp_path / 'kept'
    command = probe_command(color_folder, checkpoints[0], out, '--batch_size', '8', '--epochs', '3')  # --keep_last 2
    run_inprocess(command)
    assert sorted(f for f in os.listdir(out) if f.endswith('.pth')) == \
        ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-final.pth']
    assert f'Resumed from {out}/checkpoint-2.pth' in run_inprocess(command).stdout


def test_interrupted_probe_resumes_to_the_same_head(vit_probe, tmp_path):
    """A run killed in epoch 2 and rerun ends with the uninterrupted run's weights and log epochs."""
    done, command, _ = vit_probe
    out = tmp_path / 'probe'
    out.mkdir()
    for e in (0, 1):
        shutil.copy(done / f'checkpoint-{e}.pth', out)
    # killed after epoch 2's log line, before its checkpoint: the rerun redoes epoch 2, one line per epoch
    (out / 'log.txt').write_text(''.join(line + '\n' for line in (done / 'log.txt').read_text().splitlines()[:3]))
    resumed = run_inprocess([str(out) if a == str(done) else a for a in command])
    assert f'Resumed from {out}/checkpoint-1.pth (next epoch 2)' in resumed.stdout
    assert 'Epoch: [0]' not in resumed.stdout and 'Epoch: [1]' not in resumed.stdout
    assert [r['epoch'] for r in log_records(out)] == list(range(VIT_EPOCHS))
    a, b = load(out / 'checkpoint-final.pth')['model'], load(done / 'checkpoint-final.pth')['model']
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_linear_head_probe(color_folder, checkpoints, tmp_path):
    out = tmp_path / 'linear'
    # BatchNorm's running statistics need some iterations to settle before evaluation uses them
    run_inprocess(probe_command(color_folder, checkpoints[0], out, '--head_type', 'linear', '--batch_size', '4',
                             '--epochs', '6'))
    records = log_records(out)
    assert [r['epoch'] for r in records] == list(range(6))
    assert records[-1]['test_acc1'] >= 90, records
    state = load(out / 'checkpoint-final.pth')['model']
    assert {'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked', 'head.weight', 'head.bias'} <= set(state)
    assert not any(k.startswith('classifier') for k in state)
    assert state['bn.num_batches_tracked'].item() == 6 * 32 // 4
    mae = load(checkpoints[0])['model']
    assert torch.equal(state['blocks.1.mlp.fc1.weight'], mae['blocks.1.mlp.fc1.weight'])


def test_the_head_records_its_classes_and_test_folders_use_them(vit_probe, checkpoints, color_folder, tmp_path):
    """A test folder lacking a class keeps the others' labels (before, sorted folders were renumbered, so
    every label after a missing class shifted silently); a folder the head does not know is refused."""
    out, _, _ = vit_probe
    assert (out / 'classes.txt').read_text() == 'class_a\nclass_b\n'
    assert load(out / 'checkpoint-final.pth')['classes'] == ['class_a', 'class_b']
    only_b = tmp_path / 'only_b'
    shutil.copytree(os.path.join(color_folder, 'val', 'class_b'), only_b / 'class_b')
    command = [sys.executable, 'test_without_adaptation.py', '--data_path', str(only_b), '--model', TINY,
               '--resume_model', checkpoints[0], '--resume_finetune', str(out / 'checkpoint-final.pth'),
               '--num_classes', '2', '--dataset_name', 'folder', '--num_workers', '0', '--device', 'cpu',
               '--output_dir', str(tmp_path / 'b')]
    run_inprocess(command)
    results = json.load(open(tmp_path / 'b' / 'results.json'))
    assert results['accuracy'] >= 90  # labelled 1, as in training; renumbered it would have been 0
    shutil.copytree(os.path.join(color_folder, 'val', 'class_a'), only_b / 'class_c')
    failed = run_inprocess(command[:-1] + [str(tmp_path / 'c')], check=False)
    assert failed.returncode == 2 and "not among the head's classes: class_c" in failed.stderr


def test_defaults_are_the_released_recipes():
    import main_prob
    args = main_prob.get_args_parser().parse_args(['--data_path', 'd'])
    assert args.min_lr == 1e-6  # the released main_prob.py's
    assert args.weight_decay == 0.2 and not args.no_weight_decay_1d  # the released README's probing command


def decay_groups(out):
    """{weight decay: number of parameters} of the optimiser a probe saved with its final checkpoint."""
    groups = load(out / 'checkpoint-final.pth')['optimizer']['param_groups']
    return {g['weight_decay']: len(g['params']) for g in groups}


def test_every_head_parameter_gets_the_weight_decay(vit_probe, checkpoints):
    """The released probe: one AdamW group over the head, biases and LayerNorm weights decayed too."""
    out, _, _ = vit_probe
    state = load(checkpoints[1])['model']
    trainable = [k for k in state if k.startswith('classifier') and k != 'classifier_pos_embed']
    assert decay_groups(out) == {0.2: len(trainable)}


def test_no_weight_decay_1d_exempts_biases_and_norms(color_folder, checkpoints, tmp_path):
    run_inprocess(probe_command(color_folder, checkpoints[0], tmp_path, '--batch_size', '16', '--epochs', '1',
                                '--weight_decay', '0.1', '--no_weight_decay_1d'))
    state = load(checkpoints[1])['model']
    trainable = [k for k in state if k.startswith('classifier') and k != 'classifier_pos_embed']
    one_d = [k for k in trainable if state[k].ndim <= 1]
    assert one_d and decay_groups(tmp_path) == {0.1: len(trainable) - len(one_d), 0.: len(one_d)}
