"""The ImageNet-C sweep end to end: build corrupted sets, sweep baseline + TTT, collect the table."""
import json
import os
import sys

import pytest

from conftest import REPO, TINY, make_image_folder, run_script, torchrun

CORRUPTIONS = ['gaussian_noise', 'fog']
# --steps_per_example: a TTT-only flag (routed away from the baseline, which would refuse it); the rest both take
EXTRA = ['--', '--model', TINY, '--num_classes', '2', '--dataset_name', 'folder', '--batch_size', '4',
         '--num_workers', '0', '--device', 'cpu', '--classifier_depth', '1', '--steps_per_example', '20']


def sweep(corrupted, out, checkpoints, env=None):
    mae, probe = checkpoints
    return run_script(['bash', 'scripts/sweep_imagenet_c.sh', corrupted, str(out), mae, probe, '--severity', '5',
                       '--corruptions', ' '.join(CORRUPTIONS), *EXTRA],
                      env={'PYTHON': sys.executable, **(env or {})})


@pytest.fixture(scope='module')
def swept(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp('sweep')
    clean = make_image_folder(root / 'clean', ['class_a', 'class_b'], 3, seed=7)
    run_script([sys.executable, 'scripts/make_imagenet_c.py', '--data_path', clean, '--output_dir',
                str(root / 'c'), '--corruptions', ','.join(CORRUPTIONS), '--severities', '5', '--keep_size',
                '--workers', '1'])
    first = sweep(str(root / 'c'), root / 'out', checkpoints)
    return str(root / 'c'), root / 'out', first


def test_sweep_runs_every_corruption_and_collects_the_table(swept):
    _, out, _ = swept
    accuracies = {}
    for c in CORRUPTIONS:
        ttt = json.load(open(out / c / 'results.json'))
        base = json.load(open(out / c / 'baseline' / 'results.json'))
        assert ttt['complete'] and base['complete'] and ttt['num_images'] == 6
        assert len(ttt['accuracy_per_step']) == 21  # the paper's 20 steps (the defaults), plus step 0
        assert ttt['accuracy_per_step'][0] == base['accuracy']
        accuracies[c] = (base['accuracy'], ttt['accuracy_per_step'][-1])
    rows = {row['method']: row for row in json.load(open(out / 'summary.json'))['rows']}
    for i, method in enumerate(('baseline', 'ttt')):
        for c in CORRUPTIONS:
            assert rows[method]['cells'][c]['value'] == accuracies[c][i]
        assert rows[method]['mean']['value'] == pytest.approx(sum(a[i] for a in accuracies.values()) / 2)
    assert (out / 'summary.png').read_bytes()[:4] == b'\x89PNG'


def test_rerun_skips_finished_runs(swept, checkpoints):
    corrupted, out, _ = swept
    again = sweep(corrupted, out, checkpoints)
    assert again.stdout.count('already complete') == 4


def test_slurm_array_task_under_torchrun_equals_one_process(swept, checkpoints, tmp_path):
    corrupted, out, _ = swept
    launcher = ' '.join(torchrun(2, []))
    result = sweep(corrupted, tmp_path, checkpoints, env={'LAUNCHER': launcher, 'SLURM_ARRAY_TASK_ID': '1'})
    assert not (tmp_path / 'gaussian_noise').exists()  # task 1 is fog alone
    for sub in ('fog', 'fog/baseline'):
        a = json.load(open(out / sub / 'results.json'))
        b = json.load(open(tmp_path / sub / 'results.json'))
        assert a['accuracy_per_step'] == b['accuracy_per_step']
    assert 'fog' in result.stdout


def test_extra_flags_go_to_the_scripts_that_take_them(checkpoints, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('split_sweep_flags', os.path.join(REPO, 'scripts', 'split_sweep_flags.py'))
    route = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(route)
    parsers = {s: importlib.import_module(s).get_args_parser() for s in route.SWEPT}
    groups = route.split_flags(['--max_examples', '5', '--single_crop', '--steps_per_example=3', '--amp', 'bf16'],
                               parsers)
    both = set(route.SWEPT)
    assert groups == [(['--max_examples', '5'], both), (['--single_crop'], {'main_test_time_training'}),
                      (['--steps_per_example=3'], {'main_test_time_training'}), (['--amp', 'bf16'], both)]
    mae, probe = checkpoints
    result = run_script(['bash', 'scripts/sweep_imagenet_c.sh', str(tmp_path), str(tmp_path / 'out'), mae, probe,
                         '--', '--steps_per_example', '2', '--no_such_flag', '1'],
                        env={'PYTHON': sys.executable}, check=False)
    assert result.returncode == 2 and 'error: --no_such_flag is a flag of neither' in result.stderr


def test_the_slurm_job_file_runs_its_array_task_and_the_baselines_alone(swept, checkpoints, tmp_path):
    """scripts/imagenet_c.sbatch as SLURM runs it (bash, SLURM_ARRAY_TASK_ID set): its task's corruption,
    with the sweep's options and the scripts' flags passed through; --only baseline runs no TTT."""
    corrupted, out, _ = swept
    mae, probe = checkpoints
    env = {'PYTHON': sys.executable, 'LAUNCHER': sys.executable, 'SLURM_ARRAY_TASK_ID': '1', 'DATA': corrupted,
           'MAE': mae, 'PROBE': probe, 'TTT_ENV': str(tmp_path / 'none')}
    sweep_options = ['--severity', '5', '--corruptions', ' '.join(CORRUPTIONS)]
    run_script(['bash', 'scripts/imagenet_c.sbatch', *sweep_options, '--only', 'baseline', *EXTRA],
               env={**env, 'OUT': str(tmp_path / 'base')})
    assert (tmp_path / 'base' / 'fog' / 'baseline' / 'results.json').exists()
    assert not (tmp_path / 'base' / 'fog' / 'results.json').exists() and not (tmp_path / 'base' / 'gaussian_noise').exists()
    run_script(['bash', 'scripts/imagenet_c.sbatch', *sweep_options, *EXTRA], env={**env, 'OUT': str(tmp_path / 'all')})
    for sub in ('fog', 'fog/baseline'):
        a, b = (json.load(open(root / sub / 'results.json')) for root in (out, tmp_path / 'all'))
        assert a['accuracy_per_step'] == b['accuracy_per_step']


def test_the_papers_other_rows_fine_tune_and_joint_train(swept, checkpoints, tmp_path):
    """--finetuned evaluates a fine-tuned ViT into <corruption>/finetuned/, --joint a jointly trained MAE into
    <corruption>/joint/, each without adaptation; the collector shows them as rows of their own."""
    import torch
    import models_vit  # noqa: F401
    from models_mae import build_model
    corrupted, _, _ = swept
    torch.manual_seed(0)
    torch.save({'model': build_model('vit_micro_patch4', num_classes=2).state_dict(), 'classes': ['class_a', 'class_b']},
               tmp_path / 'ft.pth')  # a released one has 1000 outputs: ImageNet's classes
    from conftest import tiny_model
    torch.save({'model': tiny_model(num_classes=2, seed=3).state_dict(), 'classes': ['class_a', 'class_b']},
               tmp_path / 'joint.pth')  # as main_pretrain.py --joint_weight writes: the MAE and its head
    mae, probe = checkpoints
    out = tmp_path / 'out'
    result = run_script(['bash', 'scripts/sweep_imagenet_c.sh', corrupted, str(out), mae, probe, '--severity', '5',
                         '--corruptions', 'fog', '--only', 'baseline', '--finetuned', str(tmp_path / 'ft.pth'),
                         '--finetuned_model', 'vit_micro_patch4', '--joint', str(tmp_path / 'joint.pth'), *EXTRA],
                        env={'PYTHON': sys.executable})
    for sub in ('baseline', 'finetuned', 'joint'):
        assert json.load(open(out / 'fog' / sub / 'results.json'))['complete']
    assert json.load(open(out / 'fog' / 'finetuned' / 'results.json'))['args']['model'] == 'vit_micro_patch4'
    assert '| fine-tune (MAE) |' in result.stdout and '| joint train |' in result.stdout
