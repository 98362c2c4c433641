"""util/checkpoint.py and util/io.py: safe loading, strict loading, combining, atomic saving, resume."""
import argparse
import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model
from models_mae import build_model
from util import checkpoint as ckpt
from util.checkpoint import (load_test_checkpoints, latest_checkpoint, load_checkpoint, load_finetune_for_probe,
                             load_state_dict_strict, save_checkpoint)
from util.errors import UserError
from util.io import atomic_open, write_json


# ---- strict loading ----

def test_strict_load_names_missing_and_unexpected_keys():
    model = tiny_model()
    state = dict(model.state_dict())
    del state['blocks.1.attn.qkv.weight']
    state['blocks.7.attn.qkv.weight'] = torch.zeros(1)
    with pytest.raises(UserError) as e:
        load_state_dict_strict(model, state, 'some.pth')
    msg = str(e.value)
    assert 'some.pth' in msg
    assert 'missing keys: blocks.1.attn.qkv.weight' in msg
    assert 'unexpected keys: blocks.7.attn.qkv.weight' in msg


def test_strict_load_names_shape_mismatch_and_loads_exact_dicts():
    model = tiny_model()
    state = dict(tiny_model(seed=1).state_dict())
    state['norm.weight'] = torch.ones(5)
    with pytest.raises(UserError, match=r'norm\.weight \(5,\) vs model \(32,\)'):
        load_state_dict_strict(model, state, 'x.pth')
    good = tiny_model(seed=1).state_dict()
    load_state_dict_strict(model, good, 'x.pth')
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


# ---- combining the MAE and probe checkpoints (test time) ----

def test_combined_vit_head_takes_the_classifier_from_the_probe(tmp_path):
    mae_state = tiny_model(seed=0).state_dict()
    probe_state = tiny_model(seed=1).state_dict()  # a different encoder: it must not be used
    mae = {k: v for k, v in mae_state.items() if not k.startswith('classifier')}
    probe = {k: v for k, v in probe_state.items() if not k.startswith(('decoder', 'mask_token'))}
    torch.save({'model': mae}, tmp_path / 'mae.pth')
    torch.save({'model': probe, 'epoch': 19}, tmp_path / 'probe.pth')
    state = load_test_checkpoints(tiny_model(), str(tmp_path / 'mae.pth'), str(tmp_path / 'probe.pth'), 'vit_head')[0]
    assert set(state) == set(mae_state)
    for k, v in state.items():
        src = probe_state if k.startswith('classifier') else mae_state
        assert torch.equal(v, src[k]), k
    model = tiny_model(seed=2)
    load_state_dict_strict(model, state, 'combined')
    assert torch.equal(model.classifier_pred.weight, probe_state['classifier_pred.weight'])
    assert torch.equal(model.blocks[0].attn.qkv.weight, mae_state['blocks.0.attn.qkv.weight'])


def test_combined_with_the_fixture_checkpoints_loads_strictly(checkpoints):
    mae, probe = checkpoints
    load_state_dict_strict(tiny_model(seed=5), load_test_checkpoints(tiny_model(), mae, probe, 'vit_head')[0], 'combined')


def test_combined_linear_head_maps_mae_linprobe_names(tmp_path):
    mae_state = tiny_model(head_type='linear', seed=0).state_dict()
    mae = {k: v for k, v in mae_state.items() if not k.startswith(('bn.', 'head.'))}
    # MAE's linear probe: head = Sequential(BatchNorm1d(affine=False), Linear)
    linprobe = {k: v + 1 for k, v in mae.items() if not k.startswith(('decoder', 'mask_token'))}
    linprobe.update({'head.0.running_mean': torch.randn(32), 'head.0.running_var': torch.rand(32) + 0.5,
                     'head.0.num_batches_tracked': torch.tensor(1234), 'head.1.weight': torch.randn(2, 32),
                     'head.1.bias': torch.randn(2)})
    torch.save({'model': mae}, tmp_path / 'mae.pth')
    torch.save({'model': linprobe}, tmp_path / 'linprobe.pth')
    state = load_test_checkpoints(tiny_model(head_type='linear'), str(tmp_path / 'mae.pth'), str(tmp_path / 'linprobe.pth'),
                                  'linear')[0]
    assert set(state) == set(mae_state)
    assert not any(k.startswith('head.0') or k.startswith('head.1') for k in state)
    model = tiny_model(head_type='linear', seed=3)
    load_state_dict_strict(model, state, 'combined')
    assert torch.equal(model.bn.running_mean, linprobe['head.0.running_mean'])
    assert torch.equal(model.bn.running_var, linprobe['head.0.running_var'])
    assert model.bn.num_batches_tracked.item() == 1234
    assert torch.equal(model.head.weight, linprobe['head.1.weight'])
    assert torch.equal(model.head.bias, linprobe['head.1.bias'])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mae['blocks.1.mlp.fc2.weight'])  # encoder from MAE


def test_combined_without_head_weights_is_an_error(checkpoints):
    mae, _ = checkpoints
    with pytest.raises(UserError, match='classifier'):
        load_test_checkpoints(tiny_model(), mae, mae, 'vit_head')[0]


def released_save(path, model, params, epoch, args):
    """As the released util/misc.save_model writes a checkpoint: the model's whole state, an AdamW state after a
    step, the epoch, the AMP loss scaler's state and the run's argparse.Namespace."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scaler = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000, '_growth_tracker': 7}
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch, 'scaler': scaler,
                'args': args}, path)


def test_checkpoints_saved_as_the_released_code_saves_them(image_folder, tmp_path):
    """The released scripts' files, at a small size: pre-training's (encoder, decoder, mask_token, no classifier)
    and the probe's (its whole model: encoder and ViT head, built without a decoder), each with its optimiser,
    epoch, loss scaler and Namespace. The baseline and TTT-MAE load them; the baseline's cross-entropies are
    the combined model's own."""
    import sys
    from conftest import run_inprocess
    from test_main_test_time_training import per_image
    from util.datasets import ImageFolder, TestTimeDataset
    torch.manual_seed(3)
    mae = build_model(TINY, head_type=None, norm_pix_loss=True)
    probe = build_model(TINY, head_type='vit_head', num_classes=2, no_decoder=True)
    probe.load_state_dict(mae.state_dict(), strict=False)  # the probe trained a head on the MAE's encoder
    released_save(tmp_path / 'checkpoint-799.pth', mae, list(mae.parameters()), 799, argparse.Namespace(
        model=TINY, mask_ratio=np.float64(0.75), epochs=800, blr=1e-3, norm_pix_loss=True))
    released_save(tmp_path / 'checkpoint-19.pth', probe, [p for n, p in probe.named_parameters()
                                                          if n.startswith('classifier')], 19,
                  argparse.Namespace(model=TINY, head_type='vit_head', classifier_depth=1, weight_decay=0.2))
    (tmp_path / 'classes.txt').write_text('class_a\nclass_b\n')  # the released probe records no class names
    common = ['--data_path', f'{image_folder}/val', '--model', TINY, '--resume_model', str(tmp_path / 'checkpoint-799.pth'),
              '--resume_finetune', str(tmp_path / 'checkpoint-19.pth'), '--num_classes', '2', '--dataset_name', 'folder',
              '--classes', str(tmp_path / 'classes.txt'), '--num_workers', '0', '--device', 'cpu']
    run_inprocess([sys.executable, 'test_without_adaptation.py', *common, '--output_dir', str(tmp_path / 'b')])
    run_inprocess([sys.executable, 'main_test_time_training.py', *common, '--output_dir', str(tmp_path / 't'),
                   '--steps_per_example', '1', '--batch_size', '2', '--single_crop', '--norm_pix_loss'])
    baseline, ttt = per_image(tmp_path / 'b'), per_image(tmp_path / 't')
    combined = build_model(TINY, head_type='vit_head', num_classes=2, norm_pix_loss=True).eval()
    combined.load_state_dict({**probe.state_dict(), **mae.state_dict()})  # the encoder of the MAE checkpoint
    dataset = TestTimeDataset(ImageFolder(f'{image_folder}/val').samples, range(16), 16)
    with torch.no_grad():
        for i, ce in zip(baseline['index'], baseline['ce_loss'][:, 0]):
            item = dataset[int(i)]
            own = F.cross_entropy(combined.logits(item['image'][None]), torch.tensor([item['label']]))
            assert ce == pytest.approx(own.item(), rel=1e-5)
    assert np.array_equal(ttt['pred'][:, 0], baseline['pred'][:, 0])


# ---- safe loading ----

def _touch(path):
    open(path, 'w').close()


class Payload:
    """Unpickling this runs code (here: creates a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


class MyOrderedDict(collections.OrderedDict):
    pass


def test_refuses_a_pickled_callable_and_does_not_run_it(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': {'w': torch.ones(1)}, 'args': Payload(str(marker))}, tmp_path / 'evil.pth')
    with pytest.raises(UserError) as e:
        load_checkpoint(str(tmp_path / 'evil.pth'))
    assert '_touch' in str(e.value) and 'evil.pth' in str(e.value)
    assert not marker.exists()


def test_refuses_os_system(tmp_path):
    torch.save({'model': {}, 'f': os.system}, tmp_path / 'sys.pth')
    with pytest.raises(UserError, match=r'pickled posix\.system') as e:
        load_checkpoint(str(tmp_path / 'sys.pth'))
    assert 'weights_only' not in str(e.value) and 'safe_globals' not in str(e.value)  # no unsafe advice


def test_refuses_an_ordered_dict_subclass(tmp_path):
    state = MyOrderedDict(w=torch.ones(2))
    torch.save({'model': state}, tmp_path / 'sub.pth')
    with pytest.raises(UserError, match='MyOrderedDict'):
        load_checkpoint(str(tmp_path / 'sub.pth'))


def test_loads_namespace_and_numpy_scalars(tmp_path):
    args = argparse.Namespace(lr=np.float64(1.0), epochs=np.int64(3), wd=np.float32(0.5), flag=np.bool_(True),
                              name='x', sizes=(1, 2), arr=np.arange(3))
    model = tiny_model()
    torch.save({'model': model.state_dict(), 'args': args, 'epoch': 2}, tmp_path / 'c.pth')
    c = load_checkpoint(str(tmp_path / 'c.pth'))
    assert isinstance(c['args'], argparse.Namespace)
    assert c['args'].lr == 1.0 and c['args'].epochs == 3 and c['args'].flag and c['args'].name == 'x'
    assert np.array_equal(c['args'].arr, np.arange(3))
    assert all(torch.equal(v, c['model'][k]) for k, v in model.state_dict().items())


def test_loads_numpy_scalars_pickled_by_numpy_1(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray.scalar (numpy 2 says numpy._core)."""
    args = argparse.Namespace(lr=np.float64(0.25))
    path = tmp_path / 'old.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': args}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b'numpy._core.multiarray' in data
    path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    assert load_checkpoint(str(path))['args'].lr == 0.25


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match='not found'):
        load_checkpoint(str(tmp_path / 'nope.pth'), 'MAE checkpoint')
    with pytest.raises(UserError, match='not found'):
        load_checkpoint('')


# ---- saving ----

def _train_objects():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    return model, optimizer, scaler, argparse.Namespace(lr=1e-3, epochs=2)


def test_save_checkpoint_layout_and_reload(tmp_path):
    model, optimizer, scaler, args = _train_objects()
    path = str(tmp_path / 'checkpoint-0.pth')
    save_checkpoint(path, model, optimizer, 0, scaler, args)
    c = load_checkpoint(path)
    assert set(c) == {'model', 'optimizer', 'epoch', 'scaler', 'args'}
    assert c['epoch'] == 0 and c['args'] == args
    assert all(torch.equal(v, c['model'][k]) for k, v in model.state_dict().items())


def test_saved_files_follow_the_umask(tmp_path):
    """Checkpoints and results are read by other people and jobs: not owner-only temp-file modes."""
    model, optimizer, scaler, args = _train_objects()
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / 'checkpoint-0.pth'), model, optimizer, 0, scaler, args)
        write_json(str(tmp_path / 'results.json'), {'a': 1})
        with open(tmp_path / 'plain.txt', 'w'):
            pass
    finally:
        os.umask(old)
    for name in ('checkpoint-0.pth', 'results.json'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == os.stat(tmp_path / 'plain.txt').st_mode & 0o777 == 0o644


def test_save_is_atomic_when_torch_save_fails(tmp_path, monkeypatch):
    model, optimizer, scaler, args = _train_objects()
    path = tmp_path / 'checkpoint-3.pth'
    save_checkpoint(str(path), model, optimizer, 3, scaler, args)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, 'wb') as out:
            out.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(ckpt.torch, 'save', broken_save)
    with torch.no_grad():
        model.norm.weight.add_(1)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(str(path), model, optimizer, 4, scaler, args)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['checkpoint-3.pth']


def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write('new')
            raise RuntimeError
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['a.txt']
    with atomic_open(str(path)) as f:
        f.write('new')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['a.txt']


def test_latest_checkpoint_picks_the_highest_epoch(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for name in ('checkpoint-2.pth', 'checkpoint-10.pth', 'checkpoint-9.pth', 'checkpoint-final.pth',
                 '.checkpoint-11.pth.abc123.tmp', 'checkpoint-12.pth.bak', 'other-13.pth'):
        (tmp_path / name).write_bytes(b'')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-10.pth')
    only_final = tmp_path / 'f'
    only_final.mkdir()
    (only_final / 'checkpoint-final.pth').write_bytes(b'')
    assert latest_checkpoint(str(only_final)) is None


def test_resume_training_restores_model_optimizer_and_epoch(tmp_path):
    model, optimizer, scaler, args = _train_objects()
    model(torch.randn(2, 3, 16, 16))[0]['mae'].backward()
    optimizer.step()
    save_checkpoint(str(tmp_path / 'checkpoint-4.pth'), model, optimizer, 4, scaler, args)
    fresh, fresh_opt, fresh_scaler, _ = _train_objects()
    run_args = argparse.Namespace(resume='', output_dir=str(tmp_path), start_epoch=0)
    ckpt.resume_training(run_args, fresh, fresh_opt, fresh_scaler)
    assert run_args.start_epoch == 5
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert fresh_opt.state_dict()['state'][0]['step'] == 1


# ---- --finetune for probing ----

def test_load_finetune_drops_decoder_and_head_and_resizes_pos_embed(tmp_path):
    torch.manual_seed(0)
    big = build_model(TINY, img_size=32, num_classes=2)  # 8x8 patch grid
    state = big.state_dict()
    with torch.no_grad():
        state['pos_embed'] += torch.randn_like(state['pos_embed'])  # learnt-looking, not the fixed table
    torch.save({'model': state}, tmp_path / 'mae32.pth')
    model = tiny_model(no_decoder=True, seed=1)  # 16x16 images: 4x4 grid
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('classifier')}
    load_finetune_for_probe(model, str(tmp_path / 'mae32.pth'))
    own = model.state_dict()
    grid = state['pos_embed'][:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert own['pos_embed'].shape == (1, 17, 32)
    assert torch.equal(own['pos_embed'][:, :1], state['pos_embed'][:, :1])
    assert torch.allclose(own['pos_embed'][:, 1:], resized, atol=1e-6)
    for k, v in own.items():
        if k.startswith('classifier'):
            assert torch.equal(v, head_before[k]), f'{k} must stay at initialisation'
        elif k != 'pos_embed':
            assert torch.equal(v, state[k]), k
    assert not any(k.startswith(('decoder', 'mask_token')) for k in own)


def test_load_finetune_drops_a_linear_head(tmp_path):
    state = tiny_model(head_type='linear', num_classes=1000).state_dict()
    torch.save({'model': state}, tmp_path / 'lin.pth')
    model = tiny_model(head_type='linear', no_decoder=True, seed=1)  # 2 classes: head.* would not fit
    head = model.head.weight.clone()
    load_finetune_for_probe(model, str(tmp_path / 'lin.pth'))
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.blocks[0].norm1.weight, state['blocks.0.norm1.weight'])


def test_load_finetune_errors_name_the_keys(tmp_path):
    state = {k: v for k, v in tiny_model().state_dict().items() if k != 'blocks.1.mlp.fc1.weight'}
    torch.save({'model': state}, tmp_path / 'partial.pth')
    with pytest.raises(UserError, match=r'missing keys: blocks\.1\.mlp\.fc1\.weight'):
        load_finetune_for_probe(tiny_model(no_decoder=True), str(tmp_path / 'partial.pth'))
    state = {'module.' + k: v for k, v in tiny_model().state_dict().items()}
    torch.save({'model': state}, tmp_path / 'ddp.pth')
    with pytest.raises(UserError, match=r'unexpected keys: module\.'):
        load_finetune_for_probe(tiny_model(no_decoder=True), str(tmp_path / 'ddp.pth'))


@pytest.mark.parametrize('content', [b'', b'this is not a checkpoint', b'{"model": 1}', 'truncated',
                                     b'\x89PNG\r\n\x1a\n' + bytes(range(256))])
def test_unreadable_files_are_user_errors(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content == 'truncated':
        torch.save({'model': tiny_model().state_dict()}, path)
        content = path.read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(UserError, match=r'cannot read checkpoint .*bad\.pth') as e:  # not a refusal: no global
        load_checkpoint(str(path))
    assert 'weights_only' not in str(e.value)  # torch's advice to load it unsafely is not relayed
