"""util/compat.py: what older versions of this code wrote, made here as they wrote it, is still read: a
results folder continues, a pre-training checkpoint resumes, an online stream state is refused in one line."""
import argparse
import sys

import pytest
import torch
from timm.optim import param_groups_weight_decay

from conftest import TINY, run_inprocess
from models_mae import build_model
from test_main_pretrain import pretrain_args
from test_records import add
from util.checkpoint import save_checkpoint
from util.compat import settings_as_now
from util.errors import UserError
from util.records import ResultStore
from util.run_config import check_run_config
from util.streams import StreamState


def test_a_results_folder_that_recorded_the_old_online_flags_continues(tmp_path):
    """The paper's script once took the online flags, and recorded them in every run's settings."""
    config = {'lr': 0.005, 'steps_per_example': 20}
    older = {**config, 'online': False, 'online_window': 1, 'clip_grad': 0., 'encoder_lr_scale': 1.,
             'stream_order': None}
    assert settings_as_now(older) == config
    store = ResultStore(str(tmp_path))
    check_run_config(store, older, True)  # as the older version recorded it
    add(store, 0)
    store.flush()
    check_run_config(store, config, True)  # continues
    with pytest.raises(UserError, match='clip_grad: None -> 1.0'):  # a value that changes results still counts
        check_run_config(store, {**config, 'clip_grad': 1.}, True)


def test_a_pretraining_checkpoint_with_the_old_frozen_head_resumes(image_folder, tmp_path):
    """Older versions built pre-training's model with a ViT head, frozen and never trained, and saved it."""
    torch.manual_seed(0)
    model = build_model(TINY, head_type='vit_head', num_classes=2)
    for name, p in model.named_parameters():
        if name.startswith(model.parts().head):
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))  # the frozen head left out
    out = tmp_path / 'out'
    out.mkdir()
    save_checkpoint(str(out / 'checkpoint-0.pth'), model, optimizer, 0, torch.amp.GradScaler('cuda', enabled=False),
                    argparse.Namespace(model=TINY))
    assert any(k.startswith('classifier') for k in torch.load(out / 'checkpoint-0.pth', weights_only=False)['model'])
    result = run_inprocess([sys.executable, *pretrain_args(image_folder, out, 2)])
    assert 'Resumed from' in result.stdout and 'checkpoint-0.pth (next epoch 1)' in result.stdout
    saved = torch.load(out / 'checkpoint-final.pth', weights_only=False)['model']
    assert not any(k.startswith(model.parts().head) for k in saved)  # what it saves now: the released layout


def test_an_online_state_saved_by_an_older_version_is_refused_in_one_line(tmp_path):
    state = StreamState(str(tmp_path), 0)
    (tmp_path / 'online').mkdir()
    torch.save({'position': 5, 'tensors': [torch.zeros(3)]}, tmp_path / 'online' / 'rank0-00000005.pt')
    with pytest.raises(UserError, match='older version of this code'):
        state.load(5)
    state.save(6, {'weights': {'w': torch.ones(2)}, 'images': 6})
    assert state.load(6)['images'] == 6 and torch.equal(state.load(6)['weights']['w'], torch.ones(2))
