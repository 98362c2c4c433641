"""engine_test_time.py: the adaptation step, its state and reset, K images at once, the loop's math."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import REPO, TINY, make_image_folder, tiny_model
from main_test_time_training import get_args_parser
from util.datasets import ImageFolder, TestTimeDataset, training_views
from bench.reference_loop import reference_adapt

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]


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
    """Adapt to the items K = trainer.k at a time, as the run loop does."""
    results = []
    for start in range(0, len(items), trainer.k):
        group = items[start:start + trainer.k]
        labels = torch.tensor([label for _, label, _, _ in group], device=trainer.device)
        raws = None if group[0][3] is None else [raw for *_, raw in group]
        results += trainer.adapt([i for i, *_ in group], labels, torch.stack([g[2] for g in group]), raws)
    return results


# Recorded with main at 4f1db74 (the engine before it was rewritten around one step for K images), with
# one thread, on an Intel x86-64 AVX512 CPU: per-image predictions, cross-entropies and reconstruction
# losses of the default mode on the fixtures above. Another CPU (another vendor or kernel library, even
# at the same capability string) rounds matrix products differently, so the recorded values are compared
# with tolerances; exact comparisons are made within this process (against the eager oracle below).
GOLDEN = np.load(f'{REPO}/tests/data/engine_golden.npz')
GOLDEN_CASES = {'single_crop': ((), True), 'random_crops_accum2': (('--accum_iter', '2'), False),
                'adam_w': (('--optimizer_type', 'adam_w', '--steps_per_example', '4'), True),
                'adam_crops': (('--optimizer_type', 'adam',), False), 'all_mode': (('--finetune_mode', 'all'), True)}
# A prediction of the two-class fixtures can only flip where its two logits are this close: far beyond
# what rounding moves logits of order 1 (about 1e-5 after the steps, see the tolerances below).
NEAR_TIE = 1e-3


def assert_matches_recorded(results, case, rtol, atol=0.):
    """Results (pred, ce, mae per image) against the recording: values to rtol/atol; predictions equal
    wherever the recorded logits are not a near tie. With two classes the gap between the logits is
    recovered from the label's cross-entropy: ce = log(1 + exp(-gap)), so |gap| = |log(exp(ce) - 1)|."""
    preds, ces, maes = (np.stack([r[i] for r in results]) for i in range(3))
    recorded_ces = GOLDEN[f'{case}/ce_loss'].astype(np.float64)
    decided = np.abs(np.log(np.expm1(recorded_ces))) > NEAR_TIE
    assert decided.mean() > 0.9  # the check below checks something
    assert np.array_equal(preds[decided], GOLDEN[f'{case}/pred'][decided])
    np.testing.assert_allclose(ces, GOLDEN[f'{case}/ce_loss'], rtol=rtol, atol=atol, err_msg='ce_loss')
    np.testing.assert_allclose(maes, GOLDEN[f'{case}/mae_loss'], rtol=rtol, atol=atol, err_msg='mae_loss')


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: more threads split the sums differently
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_default_mode_matches_the_recorded_engine(test_folder, case, one_thread):
    """The default mode against the engine as it was before the rewrite, recorded on another machine:
    rounding differences of matrix products (a few units of 6e-8 relative per product) pass through
    three or four optimiser steps (Adam divides by the gradients' RMS, which amplifies them where a
    gradient is near zero), so values agree to rtol 1e-5 (SGD) or 1e-3 absolute (Adam)."""
    extra, single_crop = GOLDEN_CASES[case]
    args = ttt_args(*extra)
    args.single_crop = single_crop
    results = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu'),
                        items_of(test_folder, raw=not single_crop))
    assert_matches_recorded(results, case, rtol=1e-5, atol=1e-3 if args.optimizer_type != 'sgd' else 1e-6)


@pytest.mark.parametrize('case', [c for c, (_, single_crop) in GOLDEN_CASES.items() if single_crop])
def test_default_mode_is_bitwise_the_eager_oracle(test_folder, case):
    """The default mode (in-place reset, decode once, multi-tensor update) against the released-style
    loop (bench/reference_loop.py: a deep copy of the model, a new per-parameter optimiser and a new
    decode for every step), in this process: the same operations in the same order, so bit for bit."""
    extra, _ = GOLDEN_CASES[case]
    args = ttt_args(*extra, '--accum_iter', '2') if case == 'single_crop' else ttt_args(*extra)
    model = tiny_model(norm_pix_loss=True)
    base_cpu = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model, args, 'cpu')
    for item, (path, label) in list(zip(items_of(test_folder, raw=False), ImageFolder(test_folder).samples))[:4]:
        (preds, ces, losses), = adapt_all(trainer, [item])
        ref_preds, ref_ces, ref_losses = reference_adapt(base_cpu, path, label, item[0], args, 'cpu')
        assert preds.tolist() == ref_preds and ces.tolist() == ref_ces and losses.tolist() == ref_losses


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_parallel_images_equal_one_at_a_time(test_folder, case, one_thread):
    """K images at once through vmap: batched matrix products sum in another order, so values agree to
    float32 rounding, amplified a little by Adam's division by the gradients' running RMS."""
    extra, single_crop = GOLDEN_CASES[case]
    args = ttt_args(*extra, '--parallel_images', '3')
    args.single_crop = single_crop
    results = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=3),
                        items_of(test_folder, raw=not single_crop))  # 10 images: the last group has 1
    # Adam: where a gradient is near zero, a rounding difference can change its step by up to lr
    assert_matches_recorded(results, case, rtol=1e-4, atol=1e-3 if args.optimizer_type != 'sgd' else 1e-6)


@pytest.fixture(scope='module')
def compiled_cpu_results():
    """The fixtures' 10 images through the compiled step, 3 at a time (one compilation, about a minute)."""
    import tempfile
    args = ttt_args('--compile', '--parallel_images', '3')
    with tempfile.TemporaryDirectory() as folder:
        data = make_image_folder(f'{folder}/test', ['class_a', 'class_b'], 5, seed=3)
        trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=3)
        items = items_of(data, raw=False)
        results = adapt_all(trainer, items[:3])
        with torch.compiler.set_stance('fail_on_recompile'):  # one compilation serves the later groups
            return results + adapt_all(trainer, items[3:])  # the last of them padded


@pytest.mark.slow
def test_compiled_step_equals_the_eager_loop(compiled_cpu_results):
    """The same function: inductor fuses and reorders float32 sums (and the CPU runs attention as
    explicit products), so values differ by rounding only. Each loss is a mean over 4 views x 12 masked
    patches x 48 values; reassociating such a reduction changes it by about log2(2304) = 11 roundings of
    6e-8 relative, and three SGD steps carry that through the weights: rtol 1e-5 leaves a margin of
    about ten. Predictions must be equal."""
    assert_matches_recorded(compiled_cpu_results, 'single_crop', rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_compiled_step_equals_the_eager_loop_on_cuda(test_folder):
    """TF32 against TF32: both runs round matrix inputs to 10-bit mantissas (about 5e-4 relative) in
    kernels that sum in different orders, so losses agree to about 1e-3 relative."""
    from util.run_setup import set_precision
    set_precision('cuda', strict_fp32=False)
    items = items_of(test_folder, raw=False, device='cuda')
    eager = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True).cuda(), ttt_args(), 'cuda'), items)
    args = ttt_args('--compile', '--parallel_images', '3')
    fast = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True).cuda(), args, 'cuda', k=3), items)
    for (preds, ces, losses), (ref_preds, ref_ces, ref_losses) in zip(fast, eager):
        assert preds.tolist() == ref_preds.tolist()
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
        np.testing.assert_allclose(ces, ref_ces, rtol=1e-3, atol=1e-4)


# the last case: two flat tensors (encoder and decoder side at their own lrs) and a clip per image's row
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('single_crop, extra', [
    (True, ()), (False, ()),
    (True, ('--finetune_mode', 'all', '--encoder_lr_scale', '0.1', '--clip_grad', '0.05'))])
def test_parallel_images_equal_one_at_a_time_on_the_device(test_folder, single_crop, extra, device):
    args = ttt_args('--accum_iter', '2', '--parallel_images', '3', *extra)
    args.single_crop = single_crop
    model = tiny_model(norm_pix_loss=True).to(device)
    items = items_of(test_folder, raw=not single_crop, device=device)[:5]
    expected = adapt_all(ttt.TestTimeTrainer(copy.deepcopy(model), args, device), items)
    got = adapt_all(ttt.TestTimeTrainer(model, args, device, k=3), items)
    for (preds, ces, losses), (ref_preds, ref_ces, ref_losses) in zip(got, expected):
        assert preds.tolist() == ref_preds.tolist()
        np.testing.assert_allclose(ces, ref_ces, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)


@pytest.mark.cuda
def test_engine_equals_the_reference_loop_on_cuda(test_folder):
    """As test_default_mode_is_bitwise_the_eager_oracle, on CUDA: the two loops run different kernels
    (one expanded batch against stacked copies; some backward kernels sum with atomics), so float sums
    differ in order and values agree to rounding."""
    args = ttt_args('--accum_iter', '2')
    model = tiny_model(norm_pix_loss=True)
    base_cpu = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model.to('cuda'), args, 'cuda')
    samples = ImageFolder(test_folder).samples
    for item, (path, label) in zip(items_of(test_folder, raw=False, device='cuda')[:4], samples):
        (preds, ces, losses), = adapt_all(trainer, [item])
        ref_preds, ref_ces, ref_losses = reference_adapt(base_cpu, path, label, item[0], args, 'cuda')
        assert preds.tolist() == ref_preds
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
        np.testing.assert_allclose(ces, ref_ces, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('k', [1, 3])
def test_reset_restores_start_weights_and_adaptation_touches_only_the_encoder(test_folder, k):
    model = tiny_model(norm_pix_loss=True)
    start = copy.deepcopy(model.state_dict())
    trainer = ttt.TestTimeTrainer(model, ttt_args(), 'cpu', k=k)
    adapt_all(trainer, items_of(test_folder, raw=False)[:k])
    state = model.state_dict()
    assert all(torch.equal(start[n], state[n]) for n in start)  # the model keeps the start weights
    assert trainer.params[0].shape == (k, sum(p.numel() for p in trainer_weights(model)))
    assert all(not torch.equal(row, trainer.start[0][0]) for row in trainer.params[0])  # each image's row moved
    moved = dict(zip(ttt.trainable_parameters(tiny_model(), 'encoder'),
                     (trainer.params[0][0] - trainer.start[0][0]).split([p.numel() for p in trainer_weights(model)])))
    assert all(torch.count_nonzero(moved[n]) for n in ('blocks.0.attn.qkv.weight', 'cls_token', 'patch_embed.proj.weight'))
    assert any(torch.count_nonzero(v) for s in trainer.optimizer.state.values() for v in s.values())
    trainer.reset()
    assert all(torch.equal(p, s) for p, s in zip(trainer.params, trainer.start))
    assert all(torch.equal(start[n], v) for n, v in model.state_dict().items())
    assert all(not torch.count_nonzero(v) for s in trainer.optimizer.state.values() for v in s.values())
    assert all(not torch.count_nonzero(p.grad) for p in trainer.params)


def trainer_weights(model):
    return [p for n, p in model.named_parameters()
            if not n.startswith(('decoder', 'classifier')) and not n.endswith('pos_embed')]


@pytest.mark.parametrize('anchor', [0., 40.])  # online's --online_anchor: + anchor/2 ||w - w0||^2
def test_two_steps_equal_hand_computed_sgd_with_momentum(test_folder, anchor):
    args = ttt_args('--steps_per_example', '2')
    args.online_anchor = anchor
    model = tiny_model(norm_pix_loss=True)
    reference = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model, args, 'cpu')
    index, label, image, _ = items_of(test_folder, raw=False)[7]
    adapt_all(trainer, [(index, label, image, None)])

    masks = trainer.masks([index])
    names = [n for n, p in reference.named_parameters() if p.requires_grad
             and not n.startswith(('decoder', 'classifier'))]
    params = dict(reference.named_parameters())
    start = {n: params[n].detach().clone() for n in names}
    buffers = {}
    for step in range(2):
        loss = reference(image.expand(4, -1, -1, -1), mask_ratio=0.75, input_mask=masks[step, 0, 0])[0]['mae']
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                g = g + anchor * (params[n] - start[n])
                buffers[n] = g if step == 0 else 0.9 * buffers[n] + g  # SGD momentum, no dampening
                params[n] -= args.lr * buffers[n]
    adapted = trainer.weights([p[0] for p in trainer.params])
    for n in names:
        torch.testing.assert_close(adapted[n], params[n], rtol=0, atol=1e-6)
    assert trainer.distance_from_start()[0] == pytest.approx(
        torch.cat([(params[n] - start[n]).flatten() for n in names]).norm().item(), rel=1e-4)


def test_stochastic_restore_puts_back_that_share_of_the_weights_the_same_way_each_time(test_folder):
    args = ttt_args('--steps_per_example', '1')
    args.online_restore = 0.3
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu')
    item = items_of(test_folder, raw=False)[0]
    adapt_all(trainer, [item])
    restored = trainer.params[0][0] == trainer.start[0][0]
    assert abs(restored.float().mean().item() - 0.3) < 0.03  # of about 8,000 weights
    first = trainer.params[0].detach().clone()
    adapt_all(trainer, [item])  # drawn from (seed, image, step): the same weights again
    assert torch.equal(trainer.params[0], first)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adam_w'])
def test_multi_tensor_optimizer_is_bitwise_the_per_parameter_one(test_folder, optimizer):
    """build_optimizer's foreach update == torch's default per-parameter loop on CPU, bit for bit."""
    args = ttt_args('--optimizer_type', optimizer, '--steps_per_example', '4')
    item = items_of(test_folder, raw=False)[0]
    adapted = []
    for foreach in (True, None):
        trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu')
        assert trainer.optimizer.defaults['foreach'] is True
        trainer.optimizer = ttt.build_optimizer(trainer.params, args, foreach=foreach)
        adapt_all(trainer, [item])
        adapted.append([p.detach().clone() for p in trainer.params])
    assert all(torch.equal(a, b) for a, b in zip(*adapted))
    assert not torch.equal(adapted[0][0], trainer.start[0])  # the weights did move


def test_masks_and_crops_depend_only_on_seed_and_index(test_folder):
    args = ttt_args('--accum_iter', '2')
    trainer = ttt.TestTimeTrainer(tiny_model(), args, 'cpu')
    both = trainer.masks([3, 8])
    assert both.shape == (3, 2, 2, 4, 16)  # steps, micro-batches, images, views, patches
    assert torch.equal(both[:, :, 1], trainer.masks([8])[:, :, 0])
    assert torch.equal(torch.sort(both, dim=-1).values, torch.arange(16).expand_as(both))  # permutations
    assert not torch.equal(both[:, :, 0], both[:, :, 1])
    args.seed = 1
    assert not torch.equal(trainer.masks([3]), both[:, :, :1])


def test_trainable_sets_do_not_depend_on_earlier_calls():
    model = tiny_model()
    encoder = set(ttt.trainable_parameters(model, 'encoder'))
    everything = set(ttt.trainable_parameters(model, 'all'))
    names = {n for n, _ in model.named_parameters()}
    assert everything - encoder == {n for n in names if n.startswith('decoder') and not n.endswith('pos_embed')}
    assert not any(n.endswith('pos_embed') or n.startswith('classifier') for n in everything)
    no_tokens = set(ttt.trainable_parameters(model, 'encoder_no_cls_no_msk'))
    assert encoder - no_tokens == {'cls_token', 'mask_token'}
    assert all(p.requires_grad == (n in no_tokens) for n, p in model.named_parameters())


def test_mode_switching_only_where_a_module_depends_on_it():
    model = tiny_model(head_type='linear', drop_path_rate=0.1)  # batch norm and drop path sit in the head only
    assert ttt.mode_dependent_modules(model) == []
    model.blocks[0].attn.attn_drop.p = 0.1
    assert ttt.mode_dependent_modules(model) == ['blocks.0.attn.attn_drop']
    assert ttt.TestTimeTrainer(model, ttt_args(), 'cpu').switch_modes


def test_classification_and_views_of_a_group(test_folder):
    args = ttt_args('--batch_size', '5', '--accum_iter', '2')
    trainer = ttt.TestTimeTrainer(tiny_model(), args, 'cpu', k=2)
    items = items_of(test_folder, raw=True)[:2]
    images = torch.stack([image for _, _, image, _ in items])
    own = [[(image, raw)] for _, _, image, raw in items]
    views = training_views(images, own, None, trainer.args)
    assert views.shape == (2, 2, 5, 3, 16, 16) and torch.equal(views[1, 1, 4], images[1, 0])
    args.single_crop = False
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    crops = training_views(images, own, gens, trainer.args)
    assert crops.shape == (2, 2, 5, 3, 16, 16) and not torch.equal(crops[0], crops[1])
    preds, ces = trainer.classify(images, torch.tensor([0, 1]))
    model = tiny_model().eval()
    with torch.no_grad():
        logits = model(images[:, 0], mask_ratio=0, reconstruct=False)[3]
    assert torch.equal(preds, logits.argmax(1))
    torch.testing.assert_close(ces, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction='none'))


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


def test_trainer_restricts_every_classification(test_folder):
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu', class_subset=[1])
    (preds, ces, _), = adapt_all(trainer, items_of(test_folder, raw=False)[5:6])
    assert preds.tolist() == [1] * 4 and np.allclose(ces, 0)  # one class left: certain, and always it


def test_online_views_are_spread_over_the_window(test_folder):
    args = ttt_args('--batch_size', '5')
    trainer = ttt.TestTimeTrainer(tiny_model(), args, 'cpu')
    items = items_of(test_folder, raw=True)[:3]
    window = [[(image, raw) for _, _, image, raw in items]]
    views = training_views(items[2][2], window, [None], trainer.args)
    assert views.shape == (1, 1, 5, 3, 16, 16)
    sources = [0, 1, 1, 2, 2]  # 5 views over 3 images: the newest take the remainder
    assert all(torch.equal(views[0, 0, v], items[j][2][0]) for v, j in enumerate(sources))
    args.single_crop = False
    crops = training_views(items[2][2], window, [torch.Generator().manual_seed(0)], trainer.args)
    assert crops.shape == (1, 1, 5, 3, 16, 16)


def test_online_carries_weights_and_state_round_trips(test_folder):
    items = items_of(test_folder, raw=False)[:2]
    online = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu')
    episodic = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu')
    first_online = online.adapt([0], torch.tensor([items[0][1]]), items[0][2][None], reset_weights=False,
                                reset_optimizer=False)
    assert np.array_equal(first_online[0][2], adapt_all(episodic, items[:1])[0][2])  # the same start
    saved = [t.clone() for t in online.state()]
    second = online.adapt([1], torch.tensor([items[1][1]]), items[1][2][None], reset_weights=False,
                          reset_optimizer=False)
    fresh_ce = adapt_all(episodic, items[1:2])[0][1][0]
    assert abs(second[0][1][0] - fresh_ce) > 1e-4  # classified before its first step with the carried weights
    fresh = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu')
    fresh.load_state(saved)
    again = fresh.adapt([1], torch.tensor([items[1][1]]), items[1][2][None], reset_weights=False,
                        reset_optimizer=False)
    assert all(np.array_equal(a, b) for a, b in zip(again[0], second[0]))  # a resumed stream continues exactly



# AdamW without clipping: a clipped gradient shrinks to about Adam's eps, where the update turns on the
# rounding of the gradient itself; SGD's update is linear in the clipped gradient
@pytest.mark.parametrize('optimizer, clip', [('adam_w', 0.), ('sgd', 0.05)])
def test_encoder_lr_scale_and_clipping_are_torch_param_groups_and_clip_grad_norm(test_folder, optimizer, clip):
    """--encoder_lr_scale and --clip_grad (the online recipe's) on the flat rows == the model's own
    parameters in two param groups (encoder at 0.1 lr; decoder and mask_token at lr) with
    torch.nn.utils.clip_grad_norm_ over all of them, up to float rounding (atol 1e-6 on updates of about
    lr = 1e-3 per step)."""
    args = ttt_args('--steps_per_example', '2', '--finetune_mode', 'all', '--optimizer_type', optimizer,
                    '--weight_decay', '0.05', '--lr', '1e-3', '--encoder_lr_scale', '0.1', '--clip_grad', str(clip))
    model = tiny_model(norm_pix_loss=True)
    reference = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model, args, 'cpu')
    assert len(trainer.params) == 2 and [g['lr'] for g in trainer.optimizer.param_groups] == [1e-4, 1e-3]
    index, label, image, _ = items_of(test_folder, raw=False)[7]
    adapt_all(trainer, [(index, label, image, None)])

    masks = trainer.masks([index])
    params = dict(ttt.trainable_parameters(reference, 'all'))
    decoder_side = [n for n in params if n.startswith('decoder') or n == 'mask_token']
    assert decoder_side and len(decoder_side) < len(params)
    groups = [{'params': [p for n, p in params.items() if n not in decoder_side], 'lr': 1e-4},
              {'params': [params[n] for n in decoder_side], 'lr': 1e-3}]
    optimizer = (torch.optim.SGD(groups, momentum=0.9) if optimizer == 'sgd' else
                 torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.05))
    for step in range(2):
        optimizer.zero_grad()
        reference(image.expand(4, -1, -1, -1), mask_ratio=0.75, input_mask=masks[step, 0, 0])[0]['mae'].backward()
        if clip:
            assert torch.nn.utils.clip_grad_norm_(list(params.values()), clip) > 2 * clip  # the clip bites
        optimizer.step()
    adapted = trainer.weights([p[0] for p in trainer.params])
    assert set(adapted) == set(params)
    for n, p in params.items():
        torch.testing.assert_close(adapted[n], p.detach(), rtol=0, atol=1e-6)


def test_online_ema_classifies_with_the_average_of_the_adapted_weights(test_folder):
    """--online_ema m: after each step ema = m ema + (1 - m) w, from the loaded weights; the image is
    classified with ema, and ema travels with the state."""
    items = items_of(test_folder, raw=False)[:1]
    args = ttt_args('--steps_per_example', '2')
    args.online_ema = 0.75
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu')
    _, ces, _ = adapt_all(trainer, items)[0]
    weights = []
    for steps in ('1', '2'):  # the adapted weights after step 1 and 2 (the masks of step 1 do not depend on the steps)
        plain = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--steps_per_example', steps), 'cpu')
        plain_ces = adapt_all(plain, items)[0][1]
        weights.append(plain.params[0][0].detach().clone())
    assert plain_ces[0] == ces[0]  # before the first step: the loaded weights either way
    start = trainer.start[0][0]
    expected = 0.75 * (0.75 * start + 0.25 * weights[0]) + 0.25 * weights[1]
    torch.testing.assert_close(trainer.ema[0][0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(trainer.params[0][0], weights[1], rtol=0, atol=0)  # the steps are unchanged
    model = tiny_model(norm_pix_loss=True)
    model.load_state_dict(trainer.weights([e[0] for e in trainer.ema]), strict=False)
    ce = torch.nn.functional.cross_entropy(model.eval().logits(items[0][2]), torch.tensor([items[0][1]]))
    assert ces[-1] == pytest.approx(ce.item(), rel=1e-5)
    assert abs(ces[-1] - plain_ces[-1]) > 1e-4
    assert torch.equal(trainer.state()[1], trainer.ema[0])  # saved with the stream, after the weights

def test_micro_batches_are_the_same_step(test_folder):
    """--batch_size 4 --accum_iter 2 (a smaller GPU) is --batch_size 8 up to float rounding: the same masks
    (one stream for every step, micro-batch and view), the same lr, the mean loss over the 8 views."""
    items = items_of(test_folder, raw=False)[:3]
    whole = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--batch_size', '8'), 'cpu'), items)
    split = adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True),
                                          ttt_args('--batch_size', '4', '--accum_iter', '2'), 'cpu'), items)
    for (preds, ces, losses), (ref_preds, ref_ces, ref_losses) in zip(split, whole):
        assert preds.tolist() == ref_preds.tolist()
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        np.testing.assert_allclose(ces, ref_ces, rtol=1e-5, atol=1e-6)


def test_fp16_loss_scale_starts_afresh_for_every_image_and_travels_with_the_online_state(test_folder):
    items = items_of(test_folder, raw=False)[:1]
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--amp', 'fp16'), 'cpu')
    adapt_all(trainer, items)
    trainer.scaler.update(new_scale=8.)  # as after overflows on this image
    saved = [t.clone() for t in trainer.state()]
    assert saved[-1].tolist() == [8., 3.]  # the scale and the steps since its last change
    trainer.reset()
    assert trainer.scaler.get_scale() == 2. ** 16  # the next image does not inherit this one's scale
    trainer.load_state(saved)
    assert trainer.scaler.get_scale() == 8. and all(torch.equal(a, b) for a, b in zip(trainer.state(), saved))


# What CUDA graphs need of the compiled step, checked on the CPU: dynamo traces the step and the
# classification as one graph each, reads every input that stays between replays (the weights, frozen or
# trained) where it is, and does not compile again for another image, group or reset.

def graph_inputs_copied_per_call(fn, *inputs):
    """fn traced as one graph (fullgraph: a graph break is an error); returns the names of its inputs not
    marked static, which a CUDA graph would copy into its own memory on every replay."""
    copied = []

    def audit(graph_module, example_inputs):
        copied.extend(node.name for node in graph_module.graph.find_nodes(op='placeholder')
                      if not node.meta.get('tensor_dict', {}).get('_dynamo_static_input_type'))
        return graph_module.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=audit, fullgraph=True, dynamic=False)(*inputs)
    return copied


@pytest.mark.filterwarnings('ignore:There is a performance drop')  # vmap of the CPU's fused kernel: expected
@pytest.mark.parametrize('fused_attention', [False, True])  # the CPU's explicit products, CUDA's fused kernel
@pytest.mark.parametrize('k', [1, 3])
def test_step_and_classification_are_one_graph_that_copies_only_the_images(test_folder, k, fused_attention):
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--parallel_images', str(k)), 'cpu', k=k)
    for m in trainer.model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused_attention
    items = items_of(test_folder, raw=False)[:k]
    images = torch.stack([image for _, _, image, _ in items])
    views = training_views(images, [[(image, None)] for image in images], None, trainer.args)
    masks = trainer.masks([index for index, *_ in items])
    # the per-call inputs only: views and masks of one micro-batch, the images to classify
    assert len(graph_inputs_copied_per_call(trainer._losses, views[0], masks[0, 0])) == 2
    assert len(graph_inputs_copied_per_call(trainer._logits, images)) == 1


@pytest.mark.parametrize('k', [1, 3])
def test_no_recompile_across_images_padded_groups_micro_batches_resets_and_resumes(test_folder, k):
    args = ttt_args('--parallel_images', str(k), '--accum_iter', '2', '--optimizer_type', 'adam_w')
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=k)
    torch._dynamo.reset()
    # the dynamo front end of --compile (its guards decide recompiles), with a cheap back end
    trainer._losses, trainer._logits = (torch.compile(f, backend='aot_eager', fullgraph=True, dynamic=False)
                                        for f in (trainer._losses, trainer._logits))
    items = items_of(test_folder, raw=False)[:k + 1]  # a full group, then one padded
    adapt_all(trainer, items[:k])
    with torch.compiler.set_stance('fail_on_recompile'):
        adapt_all(trainer, items)
        saved = [t.clone() for t in trainer.state()]
        trainer.reset()
        trainer.load_state(saved)
        adapt_all(trainer, items[:1])


def test_weights_gradients_and_optimizer_state_stay_where_a_graph_reads_them(test_folder):
    trainer = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args('--optimizer_type', 'adam_w'), 'cpu', k=3)
    addresses = lambda: [trainer.params[0].data_ptr(), trainer.params[0].grad.data_ptr()] + \
        [t.data_ptr() for t in trainer.state()[1:]]
    before = addresses()
    assert len(before) == 5  # weights, gradients, Adam's step and two moments
    adapt_all(trainer, items_of(test_folder, raw=False)[:3])
    saved = [t.clone() for t in trainer.state()]
    trainer.reset()
    trainer.load_state(saved)
    assert addresses() == before
