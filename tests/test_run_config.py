"""util/run_config.py: what a run's results depend on, and the check that a rerun continues the same run."""
import pytest

from test_engine_run import args_for
from test_records import add
from util.errors import UserError
from util.records import ResultStore
from util.run_config import check_run_config, run_config


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    store = ResultStore(str(tmp_path))
    check_run_config(store, {'lr': 0.1}, True)  # the first run died before its first image
    check_run_config(store, {'lr': 0.2}, True)  # no results yet: the new settings replace the old
    add(store, 0)
    store.flush()
    check_run_config(store, {'lr': 0.2}, True)
    with pytest.raises(UserError, match='lr: 0.2 -> 0.3'):
        check_run_config(store, {'lr': 0.3}, True)


def test_run_config_keeps_what_results_depend_on(checkpoints):
    args = args_for(checkpoints, 'some/folder', '--num_workers', '3', '--print_freq', '7')
    config = run_config(args, {'resume_model': 'aa', 'resume_finetune': 'bb'})
    assert (config['resume_model_sha256'], config['resume_finetune_sha256']) == ('aa', 'bb')
    assert 'subset_file_sha256' not in config
    assert run_config(args, {'resume_model': 'aa', 'resume_finetune': 'bb'}, 'cc')['subset_file_sha256'] == 'cc'
    assert vars(args) == vars(args_for(checkpoints, 'some/folder', '--num_workers', '3', '--print_freq', '7'))
    assert config['steps_per_example'] == 20 and config['device_type'] == 'cpu'
    assert config['data'].endswith('some/folder')
    assert not {'num_workers', 'print_freq', 'output_dir', 'world_size', 'resume_model'} & set(config)
    online = run_config(args, {'resume_model': 'aa', 'resume_finetune': 'bb'},
                        settings={'online': True, 'online_processes': 2})  # a protocol's own settings
    assert online['online'] and online['online_processes'] == 2
