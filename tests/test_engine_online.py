"""engine_online.py: the online trainer's hooks on the paper's trainer, each against plain torch or by hand:
carried weights, its state by name, the lr groups and clipping, stochastic restore, the weights' average."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import tiny_model
from engine_online import OnlineTrainer
from main_online_ttt import get_args_parser
from test_engine_test_time import adapt_all, adapted, items_of, test_folder, ttt_args  # noqa: F401 (fixtures)
from util.finetune_modes import choose_parameters


def online_args(*extra):
    """The online script's flags, with the paper's recipe unless asked otherwise."""
    args = get_args_parser().parse_args(
        ['--data_path', 'unused', '--resume_model', 'm', '--resume_finetune', 'p', '--model', 'mae_vit_micro_patch4',
         '--batch_size', '4', '--steps_per_example', '3', '--single_crop', '--norm_pix_loss', '--num_classes', '2',
         '--lr', '0.05', '--device', 'cpu', '--optimizer_type', 'sgd', '--finetune_mode', 'encoder',
         '--encoder_lr_scale', '1', '--clip_grad', '0', '--online_window', '1', *extra])
    args.input_size = 16
    return args


def test_the_defaults_are_the_follow_up_works_recipe():
    args = get_args_parser().parse_args(['--data_path', 'd', '--resume_model', 'm', '--resume_finetune', 'p'])
    assert (args.steps_per_example, args.finetune_mode, args.optimizer_type, args.lr, args.weight_decay,
            args.encoder_lr_scale, args.clip_grad, args.online_window, args.stream_order,
            args.online_keep_optimizer) == (1, 'all', 'adam_w', 1e-4, 0.05, 0.1, 1., 16, 'shuffled', False)


def test_a_reset_before_every_image_is_the_paper_trainer_bit_for_bit(test_folder):
    items = items_of(test_folder, raw=False)[:3]
    episodic = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu'), items)
    online = adapt_all(OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--online_reset_every', '1'), 'cpu'),
                       items)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(episodic, online) for k in a)


def test_weights_carry_over_and_the_state_round_trips_by_name(test_folder):
    items = items_of(test_folder, raw=False)[:2]
    online = OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--online_keep_optimizer'), 'cpu')
    episodic = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu')
    first = adapt_all(online, items[:1])[0]
    assert np.array_equal(first['mae_loss'], adapt_all(episodic, items[:1])[0]['mae_loss'])  # the same start
    saved = copy.deepcopy(online.state())
    assert set(saved) == {'weights', 'optimizer', 'scaler', 'images'} and saved['images'] == 1
    assert set(saved['weights']) == set(online.params)
    second = adapt_all(online, items[1:])[0]
    fresh_ce = adapt_all(episodic, items[1:])[0]['ce_loss'][0]
    assert abs(second['ce_loss'][0] - fresh_ce) > 1e-4  # classified before its first step with the carried weights
    resumed = OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--online_keep_optimizer'), 'cpu')
    resumed.load_state(saved)
    again = adapt_all(resumed, items[1:])[0]
    assert all(np.array_equal(again[k], second[k]) for k in second)  # a resumed stream continues exactly


# AdamW without clipping: a clipped gradient shrinks to about Adam's eps, where the update turns on the
# rounding of the gradient itself; SGD's update is linear in the clipped gradient
@pytest.mark.parametrize('optimizer, clip', [('adam_w', 0.), ('sgd', 0.05)])
def test_encoder_lr_scale_and_clipping_are_torch_param_groups_and_clip_grad_norm(test_folder, optimizer, clip):
    """--encoder_lr_scale and --clip_grad == the model's own parameters in two param groups (encoder at
    0.1 lr; decoder and mask_token at lr) with torch.nn.utils.clip_grad_norm_ over all of them, up to
    float rounding (atol 1e-6 on updates of about lr = 1e-3 per step)."""
    args = online_args('--steps_per_example', '2', '--finetune_mode', 'all', '--optimizer_type', optimizer,
                       '--weight_decay', '0.05', '--lr', '1e-3', '--encoder_lr_scale', '0.1', '--clip_grad', str(clip))
    model = tiny_model(norm_pix_loss=True)
    reference = copy.deepcopy(model)
    trainer = OnlineTrainer(model, args, 'cpu')
    assert [g['lr'] for g in trainer.optimizer.param_groups] == [1e-4, 1e-3]
    index, label, image, _ = items_of(test_folder, raw=False)[7]
    adapt_all(trainer, [(index, label, image, None)])

    masks = ttt.image_masks(args, index, 16, 'cpu')
    params = dict(choose_parameters(reference, 'all'))
    decoder_side = [n for n in params if n.startswith('decoder') or n == 'mask_token']
    assert decoder_side and len(decoder_side) < len(params)
    groups = [{'params': [p for n, p in params.items() if n not in decoder_side], 'lr': 1e-4},
              {'params': [params[n] for n in decoder_side], 'lr': 1e-3}]
    optimizer = (torch.optim.SGD(groups, momentum=0.9) if optimizer == 'sgd' else
                 torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.05))
    for step in range(2):
        optimizer.zero_grad()
        reference(image.expand(4, -1, -1, -1), mask_ratio=0.75, input_mask=masks[step, 0])[0]['mae'].backward()
        if clip:
            assert torch.nn.utils.clip_grad_norm_(list(params.values()), clip) > 2 * clip  # the clip bites
        optimizer.step()
    weights = adapted(trainer)
    assert set(weights) == set(params)
    for n, p in params.items():
        torch.testing.assert_close(weights[n], p.detach(), rtol=0, atol=1e-6)


def test_stochastic_restore_puts_back_that_share_of_the_weights_the_same_way_each_time(test_folder):
    args = online_args('--steps_per_example', '1', '--online_restore', '0.3', '--online_reset_every', '1')
    trainer = OnlineTrainer(tiny_model(norm_pix_loss=True), args, 'cpu')
    item = items_of(test_folder, raw=False)[0]
    adapt_all(trainer, [item])
    restored = torch.cat([(w == trainer.start[n]).flatten() for n, w in adapted(trainer).items()])
    assert abs(restored.float().mean().item() - 0.3) < 0.03  # of about 8,000 weights
    first = copy.deepcopy(adapted(trainer))
    adapt_all(trainer, [item])  # drawn from (seed, image, step): the same weights again
    assert all(torch.equal(w, first[n]) for n, w in adapted(trainer).items())


def test_the_average_of_the_adapted_weights_classifies(test_folder):
    """--online_ema m: after each step average = m average + (1 - m) w, from the loaded weights; the image
    is classified with it, and it travels with the state."""
    items = items_of(test_folder, raw=False)[:1]
    trainer = OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--steps_per_example', '2', '--online_ema', '0.75'),
                            'cpu')
    ces = adapt_all(trainer, items)[0]['ce_loss']
    weights = []
    for steps in ('1', '2'):  # the adapted weights after step 1 and 2 (the masks of step 1 do not depend on the steps)
        plain = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--steps_per_example', steps), 'cpu')
        plain_ces = adapt_all(plain, items)[0]['ce_loss']
        weights.append(copy.deepcopy(adapted(plain)))
    assert plain_ces[0] == ces[0]  # before the first step: the loaded weights either way
    for n, start in trainer.start.items():
        expected = 0.75 * (0.75 * start + 0.25 * weights[0][n]) + 0.25 * weights[1][n]
        torch.testing.assert_close(trainer.average[n], expected, rtol=0, atol=1e-6)
        assert torch.equal(adapted(trainer)[n], weights[1][n])  # the steps are unchanged
    model = tiny_model(norm_pix_loss=True)
    model.load_state_dict(trainer.average, strict=False)
    ce = torch.nn.functional.cross_entropy(model.eval().logits(items[0][2]), torch.tensor([items[0][1]]))
    assert ces[-1] == pytest.approx(ce.item(), rel=1e-5)
    assert abs(ces[-1] - plain_ces[-1]) > 1e-4
    assert torch.equal(trainer.state()['average']['cls_token'], trainer.average['cls_token'])


def test_periodic_reset_and_a_kept_optimizer(test_folder):
    items = items_of(test_folder, raw=False)[:3]
    trainer = OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--online_reset_every', '2',
                                                                          '--online_keep_optimizer'), 'cpu')
    adapt_all(trainer, items[:2])
    assert trainer.optimizer.state and trainer.distance_from_start() > 0
    trainer.begin_image()  # the third image of the stream: back to the loaded weights, the optimiser kept
    assert trainer.distance_from_start() == 0 and trainer.optimizer.state


def test_the_fp16_loss_scale_travels_with_the_state(test_folder):
    trainer = OnlineTrainer(tiny_model(norm_pix_loss=True), online_args('--amp', 'fp16', '--online_keep_optimizer'), 'cpu')
    adapt_all(trainer, items_of(test_folder, raw=False)[:1])
    trainer.scaler.update(new_scale=8.)  # as after overflows on this image
    saved = copy.deepcopy(trainer.state())
    assert saved['scaler']['scale'] == 8.
    trainer.reset()
    assert trainer.scaler.get_scale() == 2. ** 16
    trainer.load_state(saved)
    assert trainer.scaler.state_dict() == saved['scaler']
