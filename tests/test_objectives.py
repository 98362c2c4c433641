"""util/objectives.py: MEMO and entropy minimisation beside TTT-MAE on the same model. Each objective's step
by hand, its recipe, MEMO's views drawn from (seed, image) only, both trainers and the online one under
every objective, and the bad input of each in one line."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import tiny_model
from engine_fast import FastTrainer
from engine_online import OnlineTrainer
from main_test_time_training import get_args_parser
from test_engine_online import online_args
from test_engine_test_time import adapt_all, adapted, items_of, stacked, test_folder, ttt_args  # noqa: F401 (fixtures)
from test_main_test_time_training import script_args
from util import stop_rules
from util.errors import UserError
from util.objectives import Memo


def recipe_args(*extra):
    return get_args_parser().parse_args(['--data_path', 'd', '--resume_model', 'm', '--resume_finetune', 'p', *extra])


def test_each_objective_brings_its_recipe_where_the_command_line_sets_none():
    memo = recipe_args('--objective', 'memo')
    assert (memo.batch_size, memo.steps_per_example, memo.finetune_mode, memo.optimizer_type, memo.lr, memo.weight_decay,
            memo.single_crop) == (64, 1, 'reached', 'adam_w', 1e-5, 0.01, False)
    entropy = recipe_args('--objective', 'entropy')
    assert (entropy.batch_size, entropy.steps_per_example, entropy.finetune_mode, entropy.optimizer_type, entropy.lr,
            entropy.single_crop) == (1, 1, 'norm', 'sgd', 2.5e-4 / 64, True)
    given = recipe_args('--objective', 'memo', '--batch_size', '16', '--blr', '0.1', '--steps_per_example', '2')
    assert (given.batch_size, given.steps_per_example, given.lr) == (16, 2, 0.1 * 16 / 256)  # the command line wins
    paper = recipe_args()
    assert (paper.objective, paper.batch_size, paper.lr, paper.finetune_mode) == ('mae', 128, 1e-2 * 128 / 256, 'encoder')
    from main_online_ttt import get_args_parser as online_parser
    tent = online_parser().parse_args(['--data_path', 'd', '--resume_finetune', 'p', '--objective', 'entropy'])
    # TENT's online setting: one lr, no clipping, the momentum carried over the stream
    assert (tent.encoder_lr_scale, tent.clip_grad, tent.online_keep_optimizer, tent.online_window, tent.lr) == \
        (1., 0., True, 1, 2.5e-4 / 64)


def test_memo_adapts_every_parameter_its_gradient_reaches():
    """MEMO's 'all parameters': the encoder and the head (not the decoder, which its loss never reads)."""
    trainer = ttt.TestTimeTrainer(tiny_model(), recipe_args('--objective', 'memo', '--model', 'mae_vit_micro_patch4'),
                                  'cpu')
    names = {n for n, _ in tiny_model().named_parameters()}
    assert set(trainer.params) == {n for n in names if not n.startswith('decoder') and n != 'mask_token'
                                   and not n.endswith('pos_embed')}


def test_entropy_minimisation_is_one_sgd_step_on_the_norms_by_hand(test_folder):
    args = ttt_args('--objective', 'entropy', '--finetune_mode', 'norm', '--batch_size', '1', '--steps_per_example', '1',
                    '--lr', '0.5')
    model = tiny_model()
    reference = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model, args, 'cpu')
    assert set(trainer.params) == {n for n, _ in model.named_parameters()
                                   if 'norm' in n and n.startswith(('blocks', 'norm', 'classifier'))}
    _, label, image, _ = item = items_of(test_folder, raw=False)[4]
    record, = adapt_all(trainer, [item])
    log_p = reference.logits(image).log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum()
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(entropy, [params[n] for n in trainer.params])
    assert record['entropy_loss'][0] == pytest.approx(entropy.item(), rel=1e-6)
    assert record['objective'][0] == record['entropy_loss'][0]
    for (n, p), g in zip(trainer.params.items(), grads):
        torch.testing.assert_close(p.detach(), params[n].detach() - 0.5 * g, rtol=0, atol=1e-6)  # SGD's first step
    assert record['entropy'][1] < record['entropy'][0]  # the prediction is more certain after the step


def test_memos_loss_is_the_entropy_of_the_averaged_prediction(test_folder):
    args = ttt_args('--objective', 'memo', '--no_single_crop', '--batch_size', '6', '--finetune_mode', 'all')
    model = tiny_model()
    objective = Memo(args)
    views = torch.randn(6, 3, 16, 16)
    probabilities = model.logits(views).softmax(-1).mean(0)
    expected = -(probabilities * probabilities.log()).sum()
    torch.testing.assert_close(objective.losses(model, views, None)['memo'], expected)


def test_memos_views_come_from_the_seed_and_the_image_alone(test_folder):
    args = ttt_args('--objective', 'memo', '--no_single_crop', '--batch_size', '8')
    items = items_of(test_folder, raw=True)[:2]
    images = torch.stack([image for _, _, image, _ in items])
    raws = [raw for *_, raw in items]
    objective = Memo(args)
    views = objective.views(images, raws, [ttt.crop_generator(args, i) for i, *_ in items])
    assert views.shape == (1, 2, 8, 3, 16, 16) and torch.isfinite(views).all()  # (accum_iter, K, views, ...)
    again = objective.views(images[1:], raws[1:], [ttt.crop_generator(args, items[1][0])])
    assert torch.equal(again[:, 0], views[:, 1])  # image 1's views, whatever was drawn before them
    assert not torch.equal(views[0, 0, 0], views[0, 0, 1]) and not torch.equal(views[:, 0], views[:, 1])
    args.seed = 1
    assert not torch.equal(objective.views(images[:1], raws[:1], [ttt.crop_generator(args, items[0][0])])[:, 0],
                           views[:, 0])


@pytest.mark.parametrize('objective, extra', [('entropy', ['--finetune_mode', 'norm', '--batch_size', '1']),
                                               ('memo', ['--no_single_crop', '--batch_size', '4']),
                                               ('entropy', ['--finetune_mode', 'lora:2', '--batch_size', '2'])])
def test_both_trainers_take_every_objective(test_folder, objective, extra):
    args = ttt_args('--objective', objective, '--steps_per_example', '2', *extra)
    items = items_of(test_folder, raw=not args.single_crop)[:4]
    default = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(), args, 'cpu'), items))
    assert f'{objective}_loss' in default and np.all(np.isfinite(default[f'{objective}_loss']))
    fast = stacked(adapt_all(FastTrainer(tiny_model(), args, 'cpu', k=1), items))
    assert all(np.array_equal(fast[k], default[k]) for k in default)
    two = stacked(adapt_all(FastTrainer(tiny_model(), args, 'cpu', k=2), items))
    assert np.array_equal(two['pred'], default['pred'])
    np.testing.assert_allclose(two[f'{objective}_loss'], default[f'{objective}_loss'], rtol=1e-4, atol=1e-6)


def test_an_image_adapts_the_same_whatever_came_before(test_folder):
    """MEMO's views and the masks of every objective come from (seed, image): a resumed or sharded run adapts
    an image as an uninterrupted one does."""
    args = ttt_args('--objective', 'memo', '--no_single_crop', '--batch_size', '4', '--finetune_mode', 'all')
    items = items_of(test_folder, raw=True)[:3]
    after = adapt_all(ttt.TestTimeTrainer(tiny_model(), args, 'cpu'), items)[-1]
    alone = adapt_all(ttt.TestTimeTrainer(tiny_model(), args, 'cpu'), items[2:])[0]
    assert all(np.array_equal(after[k], alone[k]) for k in alone)


def test_online_entropy_minimisation_carries_the_norms(test_folder):
    """TENT's online setting: the weights carried over the stream."""
    args = online_args('--objective', 'entropy', '--finetune_mode', 'norm', '--batch_size', '1', '--steps_per_example',
                       '1', '--lr', '0.1')
    trainer = OnlineTrainer(tiny_model(), args, 'cpu')
    records = adapt_all(trainer, items_of(test_folder, raw=False)[:3])
    assert [r['position'] for r in records] == [0, 1, 2] and records[-1]['weight_distance'] > records[0]['weight_distance']
    assert all(n.endswith(('weight', 'bias')) and 'norm' in n for n in adapted(trainer))


def test_a_stop_rule_reads_the_objective_of_any_objective(test_folder):
    items = items_of(test_folder, raw=False)
    common = ('--objective', 'entropy', '--finetune_mode', 'norm', '--steps_per_example', '4', '--lr', '0.3')
    full = adapt_all(ttt.TestTimeTrainer(tiny_model(), ttt_args(*common), 'cpu'), items)
    live = adapt_all(ttt.TestTimeTrainer(tiny_model(), ttt_args(*common, '--stop_rule', 'plateau:0.8'), 'cpu'), items)
    for f, l in zip(full, live):
        assert l['stop_step'] == stop_rules.stop_step('plateau', 0.8, f['pred'], f['top1_prob'], f['objective'])
    assert min(l['stop_step'] for l in live) < 4


def test_an_objective_that_reads_the_head_refuses_a_model_without_one():
    with pytest.raises(UserError, match='--objective entropy reads the classification head, and --model .* has none'):
        ttt.TestTimeTrainer(tiny_model(head_type=None), ttt_args('--objective', 'entropy'), 'cpu')


@pytest.mark.parametrize('script, flags, fragment', [
    ('main_test_time_training.py', ['--objective', 'memo', '--batch_size', '1'],
     '--objective memo averages the predictions of several views: --batch_size must be 2 or more, got 1'),
    ('main_test_time_training.py', ['--objective', 'memo', '--single_crop'],
     '--objective memo draws its own augmented views of the decoded image: drop --single_crop'),
    ('main_test_time_training.py', ['--objective', 'memo', '--accum_iter', '2'],
     '--objective memo averages the predictions of all its views at once: pass --accum_iter 1'),
    ('main_online_ttt.py', ['--objective', 'memo', '--online_window', '4'],
     '--objective memo draws its own views of the current image: pass --online_window 1'),
])
def test_bad_objective_settings_are_one_line(user_error, checkpoints, image_folder, tmp_path, script, flags, fragment):
    user_error(script_args(script, checkpoints, f'{image_folder}/val', tmp_path / 'o', *flags), fragment)
