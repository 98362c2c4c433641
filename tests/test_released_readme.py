"""Every command of the released code's README parses with the script's own get_args_parser().

The commands are copied here verbatim from the released README
(https://github.com/yossigandelsman/test_time_training_mae, README.md): they are the facts this test
checks, so it needs no file outside the repository.
"""
import importlib
import os
import re
import shlex

import pytest

RELEASED_COMMANDS = {
    'main_pretrain.py': r'''
python -m torch.distributed.launch --nproc_per_node=8 main_pretrain.py \
        --data_path ${DATA_PATH} \
        --model mae_vit_large_patch16 \
        --input_size 224 \
        --batch_size 64 \
        --mask_ratio 0.75 \
        --warmup_epochs 40 \
        --epochs 800 \
        --blr 1e-3 \
        --save_ckpt_freq 100 \
        --output_dir ${OUTPUT_DIR}  \
        --dist_url "file://$OUTPUT_DIR/$TIME"
''',
    'main_prob.py': r'''
python -m torch.distributed.launch --nproc_per_node=8 main_prob.py \
        --batch_size 32 \
        --accum_iter 4 \
        --model mae_vit_large_patch16 \
        --finetune ${RESUME_MODEL} \
        --epochs 20 \
        --input_size 224 \
        --head_type vit_head \
        --blr 1e-3 \
        --norm_pix_loss \
        --weight_decay 0.2 \
        --dist_eval --data_path ${DATA_PATH} --output_dir ${OUTPUT_DIR}
''',
    'main_test_time_training.py': r'''
python main_test_time_training.py \
    --data_path "$DATA_PATH_BASE/$DATASET/$LEVEL" \
    --model mae_vit_large_patch16 \
    --input_size 224 \
    --batch_size 128 \
    --steps_per_example 20 \
    --mask_ratio 0.75 \
    --blr 1e-2 \
    --norm_pix_loss \
    --optimizer_type 'sgd' \
    --classifier_depth 12 \
    --head_type "vit_head" \
    --single_crop \
    --dataset_name "imagenet_c" \
    --output_dir "$OUTPUT_DIR_BASE/$DATASET/" \
    --dist_url "file://$OUTPUT_DIR_BASE/$TIME" \
    --finetune_mode 'encoder' \
    --resume_model ${RESUME_MODEL} \
    --resume_finetune ${RESUME_FINETUNE}
''',
    'test_without_adaptation.py': r'''
python test_without_adaptation.py \
        --data_path "$DATA_PATH_BASE/$DATASET/$LEVEL" \
        --model mae_vit_large_patch16 \
        --input_size 224 \
        --resume_model ${RESUME_MODEL} \
        --resume_finetune ${RESUME_FINETUNE} \
        --output_dir "$OUTPUT_DIR_BASE/$DATASET/baseline" \
        --classifier_depth 12 \
        --head_type "vit_head" 
''',
}
LAUNCH = ['python', '-m', 'torch.distributed.launch', '--nproc_per_node=8']


def argv_of(command):
    """(argv after the script, launched by torch.distributed.launch?) of a README command; shell
    variables become /placeholder/NAME, quotes keep each value one argument."""
    command = re.sub(r'\\\n', ' ', command).strip()
    command = re.sub(r'\$\{(\w+)\}|\$(\w+)', lambda m: f'/placeholder/{m.group(1) or m.group(2)}', command)
    tokens = shlex.split(command)
    launched = tokens[:len(LAUNCH)] == LAUNCH
    tokens = tokens[len(LAUNCH):] if launched else tokens[1:]
    return tokens[0], tokens[1:], launched


def parse(script, argv):
    return importlib.import_module(os.path.splitext(script)[0]).get_args_parser().parse_args(argv)


EXPECTED = {
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
}


def test_each_command_names_its_script():
    assert [argv_of(c)[0] for c in RELEASED_COMMANDS.values()] == list(RELEASED_COMMANDS)
    assert {s for s, c in RELEASED_COMMANDS.items() if argv_of(c)[2]} == {'main_pretrain.py', 'main_prob.py'}


@pytest.mark.parametrize('local_rank_flag', ['--local-rank=0', '--local_rank=0'])  # new and old launchers
@pytest.mark.parametrize('script', RELEASED_COMMANDS)
def test_command_parses(script, local_rank_flag):
    _, argv, launched = argv_of(RELEASED_COMMANDS[script])
    args = parse(script, argv + ([local_rank_flag] if launched else []))
    if launched:
        assert args.local_rank == 0
    assert args.model == 'mae_vit_large_patch16' and args.input_size == 224
    assert args.data_path.startswith('/placeholder/')
    for name, value in EXPECTED[script].items():
        assert getattr(args, name) == value, name


def test_unknown_flags_are_refused(capsys):
    """The check above means something: a misspelt flag does not parse."""
    _, argv, _ = argv_of(RELEASED_COMMANDS['main_prob.py'])
    with pytest.raises(SystemExit):
        parse('main_prob.py', argv + ['--weight_decayy', '0.1'])
    assert 'unrecognized arguments: --weight_decayy' in capsys.readouterr().err
