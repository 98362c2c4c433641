"""util/distributed.py: what each launcher's environment means, and its contradictions."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, TINY, make_image_folder
from main_test_time_training import get_args_parser
from util.errors import UserError
from util.distributed import init_distributed_mode

LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS',
                 'SLURM_STEP_NUM_TASKS', 'SLURM_LOCALID')


@pytest.fixture
def args(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return get_args_parser().parse_args(['--data_path', 'x', '--resume_model', 'm', '--resume_finetune', 'p',
                                         '--device', 'cpu'])


def test_no_launcher_is_one_process(args):
    init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)


def test_slurm_without_master_address_is_a_clear_error(args, monkeypatch):
    for var, value in (('SLURM_PROCID', '1'), ('SLURM_NTASKS', '2'), ('SLURM_STEP_NUM_TASKS', '2'), ('SLURM_LOCALID', '1')):
        monkeypatch.setenv(var, value)  # what srun sets for the second of two tasks
    with pytest.raises(UserError, match='MASTER_ADDR'):
        init_distributed_mode(args)
    assert (args.rank, args.world_size) == (1, 2)


def test_plain_python_in_a_slurm_allocation_of_several_tasks_is_one_process(args, monkeypatch, capsys):
    monkeypatch.setenv('SLURM_PROCID', '0')  # sbatch --ntasks=8, then `python SCRIPT` with no srun
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')  # exported for later srun steps: no rendezvous to wait at
    init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)
    assert capsys.readouterr().out.startswith('| device CPU, torch ')  # the device, once


def test_world_size_flag_must_agree_with_the_launcher(args, monkeypatch):
    args.world_size = 8
    with pytest.raises(UserError, match='--world_size 8, but 1 process'):
        init_distributed_mode(args)
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    args.world_size = 1
    init_distributed_mode(args)  # torchrun with one process: agrees, nothing to start
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)


def test_an_error_on_one_process_stops_the_others_at_once(checkpoints, tmp_path):
    """Two tasks as srun starts them (no launcher that would kill the rest): the second stops on an
    unreadable image; the first stops too, keeping what it did, instead of waiting at the end for the
    collective's 60-minute timeout."""
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 6)
    (tmp_path / 'data' / 'class_a' / 'img_001.png').write_bytes(b'not an image')  # image 1: the second task's first
    mae, probe = checkpoints
    out = tmp_path / 'out'
    command = [sys.executable, 'main_test_time_training.py', '--data_path', data, '--model', TINY, '--resume_model', mae,
               '--resume_finetune', probe, '--num_classes', '2', '--dataset_name', 'folder', '--num_workers', '0',
               '--device', 'cpu', '--steps_per_example', '1', '--batch_size', '2', '--single_crop',
               '--flush_every', '1', '--output_dir', str(out)]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, 'OMP_NUM_THREADS': '1',
           'SLURM_NTASKS': '2', 'SLURM_STEP_NUM_TASKS': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
    procs = [subprocess.Popen(command, cwd=REPO, env={**env, 'SLURM_PROCID': str(rank), 'SLURM_LOCALID': str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert outputs[1][1].startswith(f'error: cannot read image {data}/class_a/img_001.png'), outputs[1]
    assert 'error: another process stopped (rank 1: cannot read image' in outputs[0][1], outputs[0]
    assert os.listdir(out / 'partial')  # the first task's finished images are kept
