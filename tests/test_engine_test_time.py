"""engine_test_time.py: the paper's trainer (its steps by hand, its reset, its records against a recording of
the engine before it was rewritten), the loss extension point, and the loop's math."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import REPO, TINY, make_image_folder, tiny_model
from main_test_time_training import get_args_parser
from models_mae import MaskedAutoencoderViT
from util.datasets import ImageFolder, TestTimeDataset, training_views
from util.finetune_modes import choose_parameters


def ttt_args(*extra):
    args = get_args_parser().parse_args(
        ['--data_path', 'unused', '--resume_model', 'm', '--resume_finetune', 'p', '--model', TINY,
         '--batch_size', '4', '--steps_per_example', '3', '--single_crop', '--norm_pix_loss',
         '--num_classes', '2', '--lr', '0.05', '--device', 'cpu', *extra])
    args.input_size = 16
    return args


@pytest.fixture
def test_folder(tmp_path):
    return make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 5, seed=3)


def items_of(folder, raw, device='cpu'):
    """The engine's inputs for every image of the folder: (index, label, image (1, 3, H, W), raw or None)."""
    dataset = TestTimeDataset(ImageFolder(folder).samples, range(10), 16, raw=raw)
    return [(d['index'], d['label'], d['image'].unsqueeze(0).to(device), d['raw'].to(device) if raw else None)
            for d in (dataset[i] for i in range(len(dataset)))]


def adapt_all(trainer, items):
    """Adapt to the items K = trainer.k at a time, as the run loop does; each image's records."""
    results = []
    for start in range(0, len(items), trainer.k):
        group = items[start:start + trainer.k]
        labels = torch.tensor([label for _, label, _, _ in group], device=trainer.device)
        results += trainer.adapt([i for i, *_ in group], labels, torch.stack([g[2] for g in group]),
                                 [raw for *_, raw in group])
    return results


def adapted(trainer, k=0):
    """Image k's adapted weights {name: tensor}: the default trainer's own parameters, or row k of the fast one's."""
    if hasattr(trainer, 'flat'):
        return {n: w.detach() for n, w in trainer.weights(trainer.flat[k]).items()}
    return {n: p.detach() for n, p in trainer.params.items()}


def stacked(results):
    """{key: (images, ...)} of a list of per-image records."""
    return {key: np.stack([r[key] for r in results]) for key in results[0]}


# Recorded with main at 4f1db74 (the engine before it was rewritten around one step for K images), with
# one thread, on an Intel x86-64 AVX512 CPU: per-image predictions, cross-entropies and reconstruction
# losses of the default mode on the fixtures above. Another CPU (another vendor or kernel library, even
# at the same capability string) rounds matrix products differently, so the recorded values are compared
# with tolerances; exact comparisons are made within this process.
GOLDEN = np.load(f'{REPO}/tests/data/engine_golden.npz')
GOLDEN_CASES = {'single_crop': ((), True), 'random_crops_accum2': (('--accum_iter', '2'), False),
                'adam_w': (('--optimizer_type', 'adam_w', '--steps_per_example', '4'), True),
                'adam_crops': (('--optimizer_type', 'adam',), False), 'all_mode': (('--finetune_mode', 'all'), True)}
# A prediction of the two-class fixtures can only flip where its two logits are this close: far beyond
# what rounding moves logits of order 1 (about 1e-5 after the steps, see the tolerances below).
NEAR_TIE = 1e-3


def assert_matches_recorded(results, case, rtol, atol=0.):
    """Per-image records against the recording: values to rtol/atol; predictions equal wherever the
    recorded logits are not a near tie. With two classes the gap between the logits is recovered from the
    label's cross-entropy: ce = log(1 + exp(-gap)), so |gap| = |log(exp(ce) - 1)|."""
    got = stacked(results)
    recorded_ces = GOLDEN[f'{case}/ce_loss'].astype(np.float64)
    decided = np.abs(np.log(np.expm1(recorded_ces))) > NEAR_TIE
    assert decided.mean() > 0.9  # the check below checks something
    assert np.array_equal(got['pred'][decided], GOLDEN[f'{case}/pred'][decided])
    np.testing.assert_allclose(got['ce_loss'], GOLDEN[f'{case}/ce_loss'], rtol=rtol, atol=atol, err_msg='ce_loss')
    np.testing.assert_allclose(got['mae_loss'], GOLDEN[f'{case}/mae_loss'], rtol=rtol, atol=atol, err_msg='mae_loss')


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: more threads split the sums differently
    yield
    torch.set_num_threads(threads)


def golden_run(case):
    extra, single_crop = GOLDEN_CASES[case]
    args = ttt_args(*extra)
    args.single_crop = single_crop
    return args, not single_crop


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_default_trainer_matches_the_recorded_engine(test_folder, case, one_thread):
    """The default trainer against the engine as it was before the rewrite, recorded on another machine:
    rounding differences of matrix products (a few units of 6e-8 relative per product) pass through
    three or four optimiser steps (Adam divides by the gradients' RMS, which amplifies them where a
    gradient is near zero), so values agree to rtol 1e-5 (SGD) or 1e-3 absolute (Adam)."""
    args, raw = golden_run(case)
    results = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu'), items_of(test_folder, raw))
    assert_matches_recorded(results, case, rtol=1e-5, atol=1e-3 if args.optimizer_type != 'sgd' else 1e-6)


@pytest.mark.parametrize('anchor', [0., 40.])  # anchor: online's pull toward the loaded weights
def test_two_steps_equal_hand_computed_sgd_with_momentum(test_folder, anchor):
    """Two steps of the trainer == the model's own MAE loss, its gradient and SGD with momentum 0.9 written
    out by hand (the released computation, no optimiser class); the online anchor adds anchor (w - w0)."""
    from engine_online import OnlineTrainer
    args = ttt_args('--steps_per_example', '2')
    args.online_anchor, args.online_reset_every, args.online_keep_optimizer = anchor, 1, False
    args.encoder_lr_scale, args.clip_grad, args.online_restore, args.online_ema = 1., 0., 0., 0.
    args.online_window = 1
    model = tiny_model(norm_pix_loss=True)
    reference = copy.deepcopy(model)
    trainer = (OnlineTrainer if anchor else ttt.TestTimeTrainer)(model, args, 'cpu')
    index, label, image, _ = items_of(test_folder, raw=False)[7]
    adapt_all(trainer, [(index, label, image, None)])

    masks = ttt.image_masks(args, index, 16, 'cpu')
    names = list(trainer.params)
    params = dict(reference.named_parameters())
    start = {n: params[n].detach().clone() for n in names}
    buffers = {}
    for step in range(2):
        loss = reference(image.expand(4, -1, -1, -1), mask_ratio=0.75, input_mask=masks[step, 0])[0]['mae']
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                g = g + anchor * (params[n] - start[n])
                buffers[n] = g if step == 0 else 0.9 * buffers[n] + g  # SGD momentum, no dampening
                params[n] -= args.lr * buffers[n]
    weights = adapted(trainer)
    assert set(weights) == set(n for n, p in choose_parameters(tiny_model(), 'encoder').items())
    for n in names:
        torch.testing.assert_close(weights[n], params[n], rtol=0, atol=1e-6)
    if anchor:
        assert trainer.distance_from_start() == pytest.approx(
            torch.cat([(params[n] - start[n]).flatten() for n in names]).norm().item(), rel=1e-4)


def test_reset_restores_the_loaded_weights_and_adaptation_touches_only_the_encoder(test_folder):
    model = tiny_model(norm_pix_loss=True)
    start = copy.deepcopy(model.state_dict())
    trainer = ttt.TestTimeTrainer(model, ttt_args(), 'cpu')
    adapt_all(trainer, items_of(test_folder, raw=False)[:1])
    state = model.state_dict()
    moved = {n for n in start if not torch.equal(start[n], state[n])}
    assert moved == set(trainer.params)  # the adapted weights are the model's own, every one of them moved
    assert not any(n.startswith(('decoder', 'classifier')) or n.endswith('pos_embed') for n in moved)
    assert trainer.optimizer.state
    trainer.reset()
    assert all(torch.equal(start[n], v) for n, v in model.state_dict().items())  # exactly, in place
    assert not trainer.optimizer.state  # a fresh optimiser state
    again = adapt_all(trainer, items_of(test_folder, raw=False)[:1])  # the same image: the same records
    trainer.reset()
    once_more = adapt_all(trainer, items_of(test_folder, raw=False)[:1])
    assert all(np.array_equal(again[0][k], once_more[0][k]) for k in again[0])


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adam_w'])
def test_multi_tensor_optimizer_is_bitwise_the_per_parameter_one(test_folder, optimizer):
    """build_optimizer's foreach update == torch's default per-parameter loop on CPU, bit for bit."""
    args = ttt_args('--optimizer_type', optimizer, '--steps_per_example', '4')
    item = items_of(test_folder, raw=False)[0]
    results = []
    for foreach in (True, None):
        trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu')
        assert trainer.optimizer.defaults['foreach'] is True
        trainer.optimizer = ttt.build_optimizer(list(trainer.params.values()), args, foreach=foreach)
        adapt_all(trainer, [item])
        results.append({n: w.clone() for n, w in adapted(trainer).items()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert not torch.equal(results[0]['cls_token'], trainer.start['cls_token'])  # the weights did move


def test_masks_and_crops_depend_only_on_seed_and_index():
    args = ttt_args('--accum_iter', '2')
    masks = ttt.image_masks(args, 3, 16, 'cpu')
    assert masks.shape == (3, 2, 4, 16)  # steps, micro-batches, views, patches
    assert torch.equal(torch.sort(masks, dim=-1).values, torch.arange(16).expand_as(masks))  # permutations
    assert torch.equal(masks, ttt.image_masks(args, 3, 16, 'cpu'))
    assert not torch.equal(masks, ttt.image_masks(args, 8, 16, 'cpu'))
    assert torch.equal(ttt.crop_generator(args, 3).get_state(), ttt.crop_generator(args, 3).get_state())
    args.seed = 1
    assert not torch.equal(masks, ttt.image_masks(args, 3, 16, 'cpu'))


def test_trainable_sets_do_not_depend_on_earlier_calls():
    model = tiny_model()
    encoder = set(choose_parameters(model, 'encoder'))
    everything = set(choose_parameters(model, 'all'))
    names = {n for n, _ in model.named_parameters()}
    assert everything - encoder == {n for n in names if n.startswith('decoder') and not n.endswith('pos_embed')}
    assert not any(n.endswith('pos_embed') or n.startswith('classifier') for n in everything)
    no_tokens = set(choose_parameters(model, 'encoder_no_cls_no_msk'))
    assert encoder - no_tokens == {'cls_token', 'mask_token'}
    assert all(p.requires_grad == (n in no_tokens) for n, p in model.named_parameters())


def test_modes_switch_only_where_a_module_depends_on_them(test_folder):
    model = tiny_model(head_type='linear', drop_path_rate=0.1)  # batch norm and drop path sit in the head only
    assert ttt.mode_dependent_modules(model) == []
    model.blocks[0].attn.attn_drop.p = 0.1
    assert ttt.mode_dependent_modules(model) == ['blocks.0.attn.attn_drop']
    trainer = ttt.TestTimeTrainer(model, ttt_args('--steps_per_example', '1'), 'cpu')
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    adapt_all(trainer, items_of(test_folder, raw=False)[:1])
    assert seen == [False, True, False]  # classify, step, classify: the released loop's modes


def test_views_and_classification(test_folder):
    args = ttt_args('--batch_size', '5', '--accum_iter', '2')
    trainer = ttt.TestTimeTrainer(tiny_model(), args, 'cpu')
    items = items_of(test_folder, raw=True)[:2]
    images = torch.stack([image for _, _, image, _ in items])
    own = [raw for *_, raw in items]
    views = training_views(images, own, None, trainer.args)
    assert views.shape == (2, 2, 5, 3, 16, 16) and torch.equal(views[1, 1, 4], images[1, 0])
    args.single_crop = False
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    crops = training_views(images, own, gens, trainer.args)
    assert crops.shape == (2, 2, 5, 3, 16, 16) and not torch.equal(crops[0], crops[1])
    classified = trainer.classify(images[1], torch.tensor(1))
    model = tiny_model().eval()
    with torch.no_grad():
        logits = model(images[1], mask_ratio=0, reconstruct=False)[3]
    assert classified['pred'].item() == logits.argmax(1).item()
    torch.testing.assert_close(classified['ce_loss'], torch.nn.functional.cross_entropy(logits[0], torch.tensor(1)))
    p = logits[0].softmax(0)
    torch.testing.assert_close(classified['top1_prob'], p.max())
    torch.testing.assert_close(classified['entropy'], -(p * p.log()).sum())


def test_restricted_predictions_are_the_best_of_the_subset():
    """ImageNet-R/-A: the argmax and the cross-entropy over the subset's outputs; labels and predictions
    stay indices of the head's outputs."""
    logits = torch.tensor([[0., 5., 1., 2., 3.], [4., 0., 0., 9., 1.]])
    subset = torch.tensor([0, 2, 4])
    preds, ces = ttt.predictions(logits, torch.tensor([4, 0]), subset)
    assert preds.tolist() == [4, 0]  # unrestricted: 1 and 3, both outside the subset
    expected = [-torch.log_softmax(torch.tensor([0., 1., 3.]), 0)[2], -torch.log_softmax(torch.tensor([4., 0., 1.]), 0)[0]]
    torch.testing.assert_close(ces, torch.stack(expected))
    preds, _ = ttt.predictions(logits, torch.tensor([1, 3]))
    assert preds.tolist() == [1, 3]
    top1, entropy = ttt.confidence(logits, subset)  # the label-free signals over the same outputs
    restricted = logits[:, subset].softmax(1)
    torch.testing.assert_close(top1, restricted.max(1).values)
    torch.testing.assert_close(entropy, -(restricted * restricted.log()).sum(1))


def test_trainer_restricts_every_classification(test_folder):
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu', class_subset=[1])
    record, = adapt_all(trainer, items_of(test_folder, raw=False)[5:6])
    assert record['pred'].tolist() == [1] * 4 and np.allclose(record['ce_loss'], 0)  # one class: certain, always it
    assert np.allclose(record['top1_prob'], 1) and np.allclose(record['entropy'], 0)


def test_micro_batches_are_the_same_step(test_folder):
    """--batch_size 4 --accum_iter 2 (a smaller GPU) is --batch_size 8 up to float rounding: the same masks
    (one stream for every step, micro-batch and view), the same lr, the mean loss over the 8 views."""
    items = items_of(test_folder, raw=False)[:3]
    whole = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--batch_size', '8'),
                                                  'cpu'), items))
    split = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True),
                                                  ttt_args('--batch_size', '4', '--accum_iter', '2'), 'cpu'), items))
    assert np.array_equal(split['pred'], whole['pred'])
    np.testing.assert_allclose(split['mae_loss'], whole['mae_loss'], rtol=1e-5)
    np.testing.assert_allclose(split['ce_loss'], whole['ce_loss'], rtol=1e-5, atol=1e-6)


def test_fp16_loss_scale_starts_afresh_for_every_image(test_folder):
    items = items_of(test_folder, raw=False)[:1]
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--amp', 'fp16'), 'cpu')
    adapt_all(trainer, items)
    assert trainer.scaler.state_dict()['_growth_tracker'] == 3  # steps since its last change
    trainer.scaler.update(new_scale=8.)  # as after overflows on this image
    trainer.reset()
    assert trainer.scaler.get_scale() == 2. ** 16  # the next image does not inherit this one's scale


class WithTotalVariation(MaskedAutoencoderViT):
    """A second test-time loss in a few lines, as a researcher adds one: the total variation of the decoder's
    prediction, at half weight."""
    test_time_loss_weights = {'tv': 0.5}

    def test_time_losses(self, imgs, mask_ratio=0.75, input_mask=None):
        losses, pred, _, _ = self(imgs, mask_ratio=mask_ratio, input_mask=input_mask)
        return {**losses, 'tv': (pred[:, 1:] - pred[:, :-1]).abs().mean()}


def toy_second_loss_model():
    torch.manual_seed(0)
    from models_mae import MODELS
    return WithTotalVariation(**MODELS[TINY].sizes, num_classes=2, norm_pix_loss=True)


@pytest.mark.parametrize('k', [1, 3])  # the default trainer, and the fast one
def test_a_second_loss_is_minimised_and_recorded_by_name(test_folder, k):
    from engine_fast import FastTrainer
    items = items_of(test_folder, raw=False)[:3]
    args = ttt_args('--parallel_images', str(k))
    model = toy_second_loss_model()
    plain = tiny_model(norm_pix_loss=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    make = (lambda m: ttt.TestTimeTrainer(m, args, 'cpu')) if k == 1 else (lambda m: FastTrainer(m, args, 'cpu', k=k))
    both, mae_only = stacked(adapt_all(make(model), items)), stacked(adapt_all(make(plain), items))
    assert set(both) == {'pred', 'ce_loss', 'top1_prob', 'entropy', 'mae_loss', 'tv_loss', 'objective'}
    assert both['tv_loss'].shape == (3, 3) and np.all(both['tv_loss'] > 0)
    np.testing.assert_allclose(both['objective'], both['mae_loss'] + 0.5 * both['tv_loss'], rtol=1e-6)
    assert np.array_equal(mae_only['objective'], mae_only['mae_loss'])  # one loss of weight 1: the loss itself
    # step 1's losses come from the loaded weights either way; after that the second loss moved the weights
    np.testing.assert_array_equal(both['mae_loss'][:, 0], mae_only['mae_loss'][:, 0])
    assert not np.allclose(both['mae_loss'][:, 1:], mae_only['mae_loss'][:, 1:], rtol=1e-4)
    # the objective is mae + 0.5 tv: one step by hand
    reference, index, (_, label, image, _) = toy_second_loss_model(), items[0][0], items[0]
    masks = ttt.image_masks(args, index, 16, 'cpu')
    losses = reference.test_time_losses(image.expand(4, -1, -1, -1), 0.75, masks[0, 0])
    (losses['mae'] + 0.5 * losses['tv']).backward()
    trainer = ttt.TestTimeTrainer(toy_second_loss_model(), ttt_args('--steps_per_example', '1'), 'cpu')
    adapt_all(trainer, items[:1])
    with torch.no_grad():
        torch.testing.assert_close(adapted(trainer)['cls_token'],
                                   reference.cls_token - args.lr * reference.cls_token.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize('rule', ['stable:1', 'plateau:0.05', 'confident:0.55', 'fixed:2'])
def test_a_live_stop_rule_stops_where_the_rule_on_a_full_run_says(test_folder, rule):
    """--stop_rule: each image stops adapting where util/stop_rules.py, applied to the full run's records,
    says it would have; its predictions up to there are the full run's, later steps repeat the last."""
    from util import stop_rules
    items = items_of(test_folder, raw=False)
    full = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--steps_per_example', '5'), 'cpu'),
                     items)
    live = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True),
                                         ttt_args('--steps_per_example', '5', '--stop_rule', rule), 'cpu'), items)
    stops = []
    for f, l in zip(full, live):
        stop = stop_rules.stop_step(*stop_rules.parse(rule), f['pred'], f['top1_prob'], f['objective'])
        assert l['stop_step'] == stop and l['pred'][-1] == f['pred'][stop]
        assert all(np.array_equal(l[k][:stop + 1], f[k][:stop + 1]) for k in ('pred', 'ce_loss', 'top1_prob', 'entropy'))
        assert np.array_equal(l['mae_loss'][:stop], f['mae_loss'][:stop])
        assert np.all(l['pred'][stop:] == l['pred'][stop]) and l['mae_loss'].shape == (5,)
        stops.append(stop)
    assert min(stops) < 5  # the rule fired on some image
