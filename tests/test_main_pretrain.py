"""main_pretrain.py run as a user does: torchrun, torch.distributed.launch (killed and resumed), SLURM, one process."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY, run_inprocess, run_script, torchrun
from util.pos_embed import get_2d_sincos_pos_embed

EPOCHS = 5  # the kill after checkpoint-1.pth has epochs 2..4 to land in


def pretrain_args(data, out, epochs=EPOCHS, *extra):
    return ['main_pretrain.py', '--data_path', data, '--model', TINY, '--batch_size', '4',
            '--epochs', str(epochs), '--warmup_epochs', '1', '--save_ckpt_freq', '1', '--num_workers', '0',
            '--device', 'cpu', '--output_dir', str(out), *extra]


def final_model(out):
    return torch.load(os.path.join(out, 'checkpoint-final.pth'), map_location='cpu', weights_only=False)['model']


def assert_same_weights(a, b):
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'weights differ: {different[:5]}'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope='module')
def no_launcher_env():
    """No launcher variables from the calling environment: each launcher in these tests sets its own."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE',
                     'GROUP_RANK') or k.startswith(('SLURM_', 'TORCHELASTIC')):
                mp.delenv(k)
        yield


def descendants(pid):
    """Every process below pid (the launcher starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_everything(proc):
    """SIGKILL the launcher's process group and each worker's, as a node failure or scancel would."""
    for pid in descendants(proc.pid):
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope='module')
def torchrun_run(no_launcher_env, image_folder, tmp_path_factory):
    """The uninterrupted reference: 2 processes, gloo, under torchrun."""
    out = tmp_path_factory.mktemp('torchrun')
    result = run_script(torchrun(2, pretrain_args(image_folder, out)))
    return out, result


def test_torchrun_two_processes(torchrun_run):
    out, result = torchrun_run
    assert 'distributed init (rank 0 of 2, gloo)' in result.stdout
    assert 'effective batch size: 8' in result.stdout
    names = set(os.listdir(out))
    assert {f'checkpoint-{e}.pth' for e in range(EPOCHS)} | {'checkpoint-final.pth', 'log.txt'} <= names
    lines = (out / 'log.txt').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == list(range(EPOCHS))  # written once, by rank 0
    checkpoint = torch.load(out / 'checkpoint-final.pth', weights_only=False)
    assert checkpoint['epoch'] == EPOCHS - 1 and checkpoint['args'].world_size == 2
    # the released MAE layout: encoder, decoder and mask_token, no head
    assert not any(k.startswith(('classifier', 'head.', 'bn.')) for k in checkpoint['model'])
    assert 'mask_token' in checkpoint['model'] and 'decoder_pred.weight' in checkpoint['model']
    first = torch.load(out / 'checkpoint-0.pth', weights_only=False)['model']
    assert not torch.equal(first['blocks.0.attn.qkv.weight'], checkpoint['model']['blocks.0.attn.qkv.weight'])
    for name, dim in (('pos_embed', 32), ('decoder_pos_embed', 16)):  # fixed tables: never trained
        table = torch.from_numpy(get_2d_sincos_pos_embed(dim, 4, cls_token=True)).float()
        assert torch.equal(checkpoint['model'][name][0], table), name


def test_launch_killed_and_resumed_equals_uninterrupted(torchrun_run, image_folder, tmp_path):
    reference, _ = torchrun_run
    port = free_port()
    for attempt in range(3):  # a kill after the last epoch proves nothing: try again
        out = tmp_path / f'launch{attempt}'
        command = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={port}',
                   *pretrain_args(image_folder, out, EPOCHS, '--dist_url', f'file://{out}/1700000000000')]  # README
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        with open(tmp_path / f'killed{attempt}.log', 'w') as log:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = time.time() + 240
                while not (out / 'checkpoint-1.pth').exists():
                    assert proc.poll() is None, (tmp_path / f'killed{attempt}.log').read_text()[-3000:]
                    assert time.time() < deadline, 'no checkpoint-1.pth in time'
                    time.sleep(0.002)
            finally:
                kill_everything(proc)
        time.sleep(0.5)  # nothing may appear after the kill
        if not (out / 'checkpoint-final.pth').exists():
            break
    else:
        pytest.fail('the run always finished before it could be killed')
    assert not (out / 'checkpoint-final.pth').exists()
    newest = max(int(n[len('checkpoint-'):-len('.pth')]) for n in os.listdir(out)
                 if n.startswith('checkpoint-') and n.endswith('.pth'))
    assert 1 <= newest <= EPOCHS - 2  # checkpoint-final.pth is written before the last checkpoint-N.pth

    rerun = run_script(command)
    assert f'Resumed from {out}/checkpoint-{newest}.pth (next epoch {newest + 1})' in rerun.stdout
    assert 'Epoch: [0]' not in rerun.stdout  # epochs before the checkpoint are not redone
    assert_same_weights(final_model(out), final_model(reference))
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == list(range(EPOCHS))  # one line per epoch, written by rank 0


def test_slurm_two_processes_equal_torchrun(torchrun_run, image_folder, tmp_path):
    reference, _ = torchrun_run
    out = tmp_path / 'slurm'
    # the README's --dist_url file://$OUTPUT_DIR/$TIME: the store's folder does not exist yet
    args = [sys.executable, *pretrain_args(image_folder, out, EPOCHS, '--dist_url', f'file://{out}/1700000000000')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'SLURM_NTASKS': '2', 'SLURM_STEP_NUM_TASKS': '2'}  # as srun sets
    procs = [subprocess.Popen(args, cwd=REPO, env={**env, 'SLURM_PROCID': str(rank), 'SLURM_LOCALID': str(rank)},
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f'distributed init (rank 0 of 2, gloo): file://{out}/1700000000000' in outputs[0]
    assert_same_weights(final_model(out), final_model(reference))


def test_single_process_tensorboard_and_log(image_folder, tmp_path):
    out = tmp_path / 'single'
    result = run_script([sys.executable, *pretrain_args(image_folder, out, 3)])
    assert 'distributed init' not in result.stdout
    assert 'effective batch size: 4' in result.stdout
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r['train_loss']) and r['train_lr'] >= 0 for r in records)
    events = [n for n in os.listdir(out) if n.startswith('events.out.tfevents')]
    assert events
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert {'train_loss', 'lr'} <= set(acc.Tags()['scalars'])
    losses = acc.Scalars('train_loss')
    assert len(losses) == 3 * (32 // 4)  # one value per iteration (8 per epoch)
    assert all(math.isfinite(e.value) for e in losses)
    steps = [e.step for e in losses]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] < 3000  # x-axis: 1000 x epochs
    # lr: linear warm-up over the first epoch, then cosine down
    lrs = [e.value for e in acc.Scalars('lr')]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-3 * 4 / 256, rel=1e-6) and lrs[-1] < lrs[8]
    # a rerun of the finished run resumes and does nothing more
    again = run_inprocess([sys.executable, *pretrain_args(image_folder, out, 3)])
    assert 'Resumed from' in again.stdout and 'Epoch: [' not in again.stdout
    assert len((out / 'log.txt').read_text().splitlines()) == 3
    # killed after epoch 2's log line, before its checkpoints, and mid-way through a further line:
    # the rerun redoes epoch 2 and keeps one line per epoch
    final = torch.load(out / 'checkpoint-final.pth', weights_only=False)['model']
    (out / 'checkpoint-2.pth').unlink()
    (out / 'checkpoint-final.pth').unlink()
    with open(out / 'log.txt', 'a') as f:
        f.write('{"train_loss": 0.5, "ep')
    redone = run_inprocess([sys.executable, *pretrain_args(image_folder, out, 3)])
    assert 'Epoch: [2]' in redone.stdout and 'Epoch: [1]' not in redone.stdout
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2]
    again = torch.load(out / 'checkpoint-final.pth', weights_only=False)['model']
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_final_checkpoint_is_saved_before_the_last_numbered_one(image_folder, tmp_path, monkeypatch):
    """A kill between the two saves must leave checkpoint-final.pth, or the rerun would resume past the
    end from checkpoint-{last}.pth and never write it."""
    import main_pretrain
    saved = []
    real_save = main_pretrain.save_checkpoint
    monkeypatch.setattr(main_pretrain, 'save_checkpoint',
                        lambda path, *a, **k: (saved.append(os.path.basename(path)), real_save(path, *a, **k)))
    args = main_pretrain.get_args_parser().parse_args(pretrain_args(image_folder, tmp_path / 'out', 2, '--log_dir',
                                                                    '')[1:])
    main_pretrain.main(args)
    assert saved == ['checkpoint-0.pth', 'checkpoint-final.pth', 'checkpoint-1.pth']



def test_joint_weight_0_is_plain_pretraining_bit_for_bit(image_folder, tmp_path):
    run_inprocess([sys.executable, *pretrain_args(image_folder, tmp_path / 'plain', 2)])
    run_inprocess([sys.executable, *pretrain_args(image_folder, tmp_path / 'zero', 2, '--joint_weight', '0')])
    assert_same_weights(final_model(tmp_path / 'plain'), final_model(tmp_path / 'zero'))
    assert not any(k.startswith('classifier') for k in final_model(tmp_path / 'plain'))


def test_the_joint_loss_is_the_weighted_sum():
    import argparse
    from conftest import tiny_model
    from main_pretrain import joint_loss
    model = tiny_model(num_classes=2, norm_pix_loss=True)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    torch.manual_seed(5)
    got = joint_loss(model, argparse.Namespace(mask_ratio=0.75, joint_weight=0.25))(images, labels)
    torch.manual_seed(5)  # the same masks
    mae = model(images, mask_ratio=0.75)[0]['mae']
    ce = torch.nn.functional.cross_entropy(model.logits(images), labels)
    torch.testing.assert_close(got, mae + 0.25 * ce, rtol=0, atol=0)


def test_a_jointly_trained_checkpoint_loads_for_the_baseline_and_for_ttt(image_folder, tmp_path):
    """Two processes (torchrun): the MAE and the ViT head trained together; the checkpoint records the
    head's classes and serves as both --resume_model and --resume_finetune."""
    out = tmp_path / 'joint'
    run_script(torchrun(2, pretrain_args(image_folder, out, 2, '--joint_weight', '0.01', '--classifier_depth', '1')))
    checkpoint = torch.load(out / 'checkpoint-final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['classes'] == ['class_a', 'class_b'] and 'classifier_blocks.0.norm1.weight' in checkpoint['model']
    first = torch.load(out / 'checkpoint-0.pth', map_location='cpu', weights_only=False)['model']
    assert not torch.equal(first['classifier_pred.weight'], checkpoint['model']['classifier_pred.weight'])
    common = ['--data_path', f'{image_folder}/val', '--model', TINY, '--resume_model', str(out / 'checkpoint-final.pth'),
              '--resume_finetune', str(out / 'checkpoint-final.pth'), '--classifier_depth', '1', '--num_classes', '2',
              '--dataset_name', 'folder', '--num_workers', '0', '--device', 'cpu']
    run_inprocess([sys.executable, 'test_without_adaptation.py', *common, '--output_dir', str(tmp_path / 'b')])
    run_inprocess([sys.executable, 'main_test_time_training.py', *common, '--output_dir', str(tmp_path / 't'),
                   '--steps_per_example', '1', '--batch_size', '2', '--single_crop'])
    base = json.load(open(tmp_path / 'b' / 'results.json'))
    ttt = json.load(open(tmp_path / 't' / 'results.json'))
    assert base['complete'] and ttt['complete'] and ttt['accuracy_per_step'][0] == base['accuracy']


def test_the_released_classifier_depth_without_joint_training_says_it_does_nothing(image_folder, tmp_path):
    """The released pre-training command may pass --classifier_depth: without --joint_weight no head is built."""
    result = run_inprocess([sys.executable, *pretrain_args(image_folder, tmp_path / 'o', 1, '--classifier_depth', '2')])
    assert 'note: --classifier_depth has no effect without --joint_weight' in result.stdout
    assert not any(k.startswith('classifier') for k in final_model(tmp_path / 'o'))


def test_keep_last_prunes_the_older_numbered_checkpoints(image_folder, tmp_path):
    run_inprocess([sys.executable, *pretrain_args(image_folder, tmp_path / 'o', 4, '--keep_last', '2')])
    assert sorted(p.name for p in (tmp_path / 'o').glob('checkpoint-*.pth')) == [
        'checkpoint-2.pth', 'checkpoint-3.pth', 'checkpoint-final.pth']
