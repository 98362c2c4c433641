"""Every command of the released README parses with the script's own get_args_parser()."""
import importlib
import os
import re
import shlex

import pytest

from conftest import REPO

README = os.path.join(REPO, '..', 'shared', 'released', 'README.md')
SCRIPTS = ('main_pretrain.py', 'main_prob.py', 'main_test_time_training.py', 'test_without_adaptation.py')
LAUNCH = ['python', '-m', 'torch.distributed.launch', '--nproc_per_node=8']


def readme_commands():
    """(script, argv, launched) for each python command in the README's shell blocks."""
    if not os.path.isfile(README):
        return []
    with open(README) as f:
        text = f.read()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for command in re.sub(r'\\\n', ' ', block).splitlines():  # join backslash-continued lines
            command = command.strip()
            if not command.startswith('python'):
                continue
            # shell variables -> placeholders (quotes stay, so shlex keeps each value one argument)
            command = re.sub(r'\$\{(\w+)\}|\$(\w+)', lambda m: f'/placeholder/{m.group(1) or m.group(2)}', command)
            tokens = shlex.split(command)
            launched = tokens[:len(LAUNCH)] == LAUNCH
            tokens = tokens[len(LAUNCH):] if launched else tokens[1:]
            commands.append((tokens[0], tokens[1:], launched))
    return commands


COMMANDS = readme_commands()
pytestmark = pytest.mark.skipif(not COMMANDS, reason=f'the released README is not at {os.path.normpath(README)}')


def parse(script, argv):
    module = importlib.import_module(os.path.splitext(script)[0])
    return module.get_args_parser().parse_args(argv)


def test_readme_has_one_command_per_script():
    assert sorted(script for script, _, _ in COMMANDS) == sorted(SCRIPTS)
    assert {script for script, _, launched in COMMANDS if launched} == {'main_pretrain.py', 'main_prob.py'}


@pytest.mark.parametrize('local_rank_flag', ['--local-rank=0', '--local_rank=0'])  # new and old launchers
@pytest.mark.parametrize('index', range(len(COMMANDS)) if COMMANDS else [])
def test_command_parses(index, local_rank_flag):
    script, argv, launched = COMMANDS[index]
    args = parse(script, argv + ([local_rank_flag] if launched else []))
    if launched:
        assert args.local_rank == 0
    assert args.model == 'mae_vit_large_patch16' and args.input_size == 224
    assert args.data_path.startswith('/placeholder/')
    expected = {
        'main_pretrain.py': dict(batch_size=64, mask_ratio=0.75, warmup_epochs=40, epochs=800, blr=1e-3,
                                 save_ckpt_freq=100, output_dir='/placeholder/OUTPUT_DIR',
                                 dist_url='file:///placeholder/OUTPUT_DIR//placeholder/TIME'),
        'main_prob.py': dict(batch_size=32, accum_iter=4, finetune='/placeholder/RESUME_MODEL', epochs=20,
                             head_type='vit_head', blr=1e-3, norm_pix_loss=True, weight_decay=0.2,
                             dist_eval=True, output_dir='/placeholder/OUTPUT_DIR'),
        'main_test_time_training.py': dict(
            batch_size=128, steps_per_example=20, mask_ratio=0.75, blr=1e-2, norm_pix_loss=True,
            optimizer_type='sgd', classifier_depth=12, head_type='vit_head', single_crop=True,
            dataset_name='imagenet_c', finetune_mode='encoder', resume_model='/placeholder/RESUME_MODEL',
            resume_finetune='/placeholder/RESUME_FINETUNE',
            data_path='/placeholder/DATA_PATH_BASE//placeholder/DATASET//placeholder/LEVEL',
            output_dir='/placeholder/OUTPUT_DIR_BASE//placeholder/DATASET/'),
        'test_without_adaptation.py': dict(
            resume_model='/placeholder/RESUME_MODEL', resume_finetune='/placeholder/RESUME_FINETUNE',
            classifier_depth=12, head_type='vit_head',
            output_dir='/placeholder/OUTPUT_DIR_BASE//placeholder/DATASET/baseline'),
    }[script]
    for name, value in expected.items():
        assert getattr(args, name) == value, name


def test_unknown_flags_are_refused():
    """The check above means something: a misspelt flag does not parse."""
    script, argv, _ = next(c for c in COMMANDS if c[0] == 'main_prob.py')
    with pytest.raises(SystemExit):
        parse(script, argv + ['--weight_decayy', '0.1'])
