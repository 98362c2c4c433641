"""models_vit.py: MAE's fine-tuned ViT (the paper's Fine-Tune row): the released files' layout, its forward,
and the baseline evaluating it from its checkpoint alone."""
import sys

import numpy as np
import pytest
import torch

import models_vit  # noqa: F401 (registers the builders)
from conftest import check_error_line, make_image_folder, run_inprocess
from models_mae import build_model


def test_the_released_fine_tuned_layout_on_the_meta_device():
    """mae_finetuned_vit_large.pth: patch_embed, cls_token, pos_embed, 24 blocks, fc_norm and head, no norm."""
    with torch.device('meta'):
        model = build_model('vit_large_patch16')
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    block = {'norm1.weight': (1024,), 'norm1.bias': (1024,), 'attn.qkv.weight': (3072, 1024), 'attn.qkv.bias': (3072,),
             'attn.proj.weight': (1024, 1024), 'attn.proj.bias': (1024,), 'norm2.weight': (1024,),
             'norm2.bias': (1024,), 'mlp.fc1.weight': (4096, 1024), 'mlp.fc1.bias': (4096,),
             'mlp.fc2.weight': (1024, 4096), 'mlp.fc2.bias': (1024,)}
    expected = {'patch_embed.proj.weight': (1024, 3, 16, 16), 'patch_embed.proj.bias': (1024,),
                'cls_token': (1, 1, 1024), 'pos_embed': (1, 197, 1024), 'fc_norm.weight': (1024,),
                'fc_norm.bias': (1024,), 'head.weight': (1000, 1024), 'head.bias': (1000,),
                **{f'blocks.{i}.{k}': v for i in range(24) for k, v in block.items()}}
    assert shapes == expected
    assert not model.takes_test_time_training


def test_logits_are_the_global_average_pool_of_the_blocks():
    torch.manual_seed(0)
    model = build_model('vit_micro_patch4', num_classes=3).eval()
    torch.nn.init.normal_(model.pos_embed, std=0.02)
    images = torch.randn(2, 3, 16, 16)
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(2, -1, -1), x], 1) + model.pos_embed
    for blk in model.blocks:
        x = blk(x)
    expected = model.head(torch.nn.functional.layer_norm(x[:, 1:].mean(1), (32,), model.fc_norm.weight,
                                                         model.fc_norm.bias, eps=1e-6))
    torch.testing.assert_close(model.logits(images), expected)


@pytest.fixture
def fine_tuned(tmp_path):
    torch.manual_seed(1)
    model = build_model('vit_micro_patch4', num_classes=2)
    path = tmp_path / 'mae_finetuned_vit_micro.pth'
    torch.save({'model': model.state_dict()}, path)
    return model.eval(), str(path)


def baseline_command(checkpoint, data, out, *extra):
    return [sys.executable, 'test_without_adaptation.py', '--data_path', data, '--model', 'vit_micro_patch4',
            '--resume_finetune', checkpoint, '--num_classes', '2', '--dataset_name', 'folder', '--classes',
            str(data) + '.classes', '--output_dir', str(out), '--num_workers', '0', '--device', 'cpu', *extra]


def test_the_baseline_evaluates_a_fine_tuned_vit_from_its_checkpoint_alone(fine_tuned, tmp_path):
    model, path = fine_tuned
    data = make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 4, seed=2)
    (tmp_path / 'test.classes').write_text('class_a\nclass_b\n')
    run_inprocess(baseline_command(path, data, tmp_path / 'ft'))
    with np.load(tmp_path / 'ft' / 'per_image.npz') as f:
        preds, files = f['pred'][:, 0], f['filename']
    from util.datasets import TestTimeDataset, ImageFolder
    dataset = TestTimeDataset(ImageFolder(data).samples, range(8), 16)
    with torch.no_grad():
        expected = model.logits(torch.stack([dataset[i]['image'] for i in range(8)])).argmax(1)
    assert preds.tolist() == expected.tolist() and len(files) == 8


def test_a_mismatched_checkpoint_names_its_keys_and_a_decoder_checkpoint_is_refused(fine_tuned, tmp_path, capfd):
    model, _ = fine_tuned
    data = make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 1, seed=2)
    (tmp_path / 'test.classes').write_text('class_a\nclass_b\n')
    state = {k: v for k, v in model.state_dict().items() if not k.startswith('fc_norm')}
    torch.save({'model': {**state, 'norm.weight': torch.ones(32)}}, tmp_path / 'bad.pth')
    result = run_inprocess(baseline_command(str(tmp_path / 'bad.pth'), data, tmp_path / 'o'), check=False)
    line = check_error_line(result.returncode, result.stdout, result.stderr, ['fc_norm.bias'])
    assert 'norm.weight' in line
    result = run_inprocess(baseline_command(str(tmp_path / 'bad.pth'), data, tmp_path / 'o', '--resume_model',
                                            str(tmp_path / 'bad.pth')), check=False)
    check_error_line(result.returncode, result.stdout, result.stderr, ['fine-tuned ViT without a decoder'])
