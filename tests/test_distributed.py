"""util/distributed.py: what each launcher's environment means, and its contradictions."""
import pytest

from main_test_time_training import get_args_parser
from util.cli import UserError
from util.distributed import init_distributed_mode

LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS')


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
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    with pytest.raises(UserError, match='MASTER_ADDR'):
        init_distributed_mode(args)


def test_world_size_flag_must_agree_with_the_launcher(args, monkeypatch):
    args.world_size = 8
    with pytest.raises(UserError, match='--world_size 8, but 1 process'):
        init_distributed_mode(args)
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    args.world_size = 1
    init_distributed_mode(args)  # torchrun with one process: agrees, nothing to start
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)
