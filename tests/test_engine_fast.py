"""engine_fast.py against the default trainer: bit for bit with K = 1 and no compilation, to float rounding
with K images through vmap and with --compile; and what CUDA graphs need of the compiled step."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import make_image_folder, needs_compiler, tiny_model
from engine_fast import FastTrainer
from engine_run import make_trainer
from test_engine_test_time import adapt_all, adapted, assert_matches_recorded, golden_run, items_of, one_thread, stacked, \
    test_folder, ttt_args  # noqa: F401 (fixtures)
from util.datasets import training_views
from util.errors import UserError

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]
CASES = ['single_crop', 'random_crops_accum2', 'adam_w', 'adam_crops', 'all_mode']


def test_the_flags_choose_the_trainer():
    assert type(make_trainer(tiny_model(), ttt_args(), 'cpu')) is ttt.TestTimeTrainer
    assert type(make_trainer(tiny_model(), ttt_args('--parallel_images', '2'), 'cpu')) is FastTrainer
    assert make_trainer(tiny_model(), ttt_args('--compile'), 'cpu').k == 1


@pytest.mark.parametrize('case', CASES)
def test_one_flat_row_is_bitwise_the_default_trainer(test_folder, case):
    """K = 1 without compilation: the model through functional_call on row 0 of the flat weights, the
    optimiser on one flat tensor, zeroed state for a fresh one: the same operations in the same order."""
    args, raw = golden_run(case)
    items = items_of(test_folder, raw)[:4]
    default = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu'), items))
    trainer = FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=1)
    fast = stacked(adapt_all(trainer, items))
    assert set(fast) == set(default) == {'pred', 'ce_loss', 'top1_prob', 'entropy', 'mae_loss', 'objective'}
    assert all(np.array_equal(fast[k], default[k]) for k in default)


@pytest.mark.parametrize('case', CASES)
def test_parallel_images_equal_one_at_a_time(test_folder, case, one_thread):
    """K images at once through vmap: batched matrix products sum in another order, so values agree to
    float32 rounding, amplified a little by Adam's division by the gradients' running RMS."""
    args, raw = golden_run(case)
    args.parallel_images = 3
    results = adapt_all(FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=3),
                        items_of(test_folder, raw))  # 10 images: the last group has 1
    # Adam: where a gradient is near zero, a rounding difference can change its step by up to lr
    assert_matches_recorded(results, case, rtol=1e-4, atol=1e-3 if args.optimizer_type != 'sgd' else 1e-6)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('single_crop', [True, False])
def test_parallel_images_equal_the_default_trainer_on_the_device(test_folder, single_crop, device):
    args = ttt_args('--accum_iter', '2', '--parallel_images', '3')
    args.single_crop = single_crop
    model = tiny_model(norm_pix_loss=True).to(device)
    items = items_of(test_folder, raw=not single_crop, device=device)[:5]
    expected = stacked(adapt_all(ttt.TestTimeTrainer(copy.deepcopy(model), args, device), items))
    got = stacked(adapt_all(FastTrainer(model, args, device, k=3), items))
    assert np.array_equal(got['pred'], expected['pred'])
    np.testing.assert_allclose(got['ce_loss'], expected['ce_loss'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got['mae_loss'], expected['mae_loss'], rtol=1e-4)


@pytest.fixture(scope='module')
def compiled_cpu_results():
    """The fixtures' 10 images through the compiled step, 3 at a time (one compilation, about a minute)."""
    import tempfile
    args = ttt_args('--compile', '--parallel_images', '3')
    with tempfile.TemporaryDirectory() as folder:
        data = make_image_folder(f'{folder}/test', ['class_a', 'class_b'], 5, seed=3)
        trainer = FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=3)
        items = items_of(data, raw=False)
        results = adapt_all(trainer, items[:3])
        with torch.compiler.set_stance('fail_on_recompile'):  # one compilation serves the later groups
            return results + adapt_all(trainer, items[3:])  # the last of them padded


@pytest.mark.slow
@needs_compiler
def test_compiled_step_equals_the_default_trainer(compiled_cpu_results):
    """The same function: inductor fuses and reorders float32 sums (and the CPU runs attention as
    explicit products), so values differ by rounding only. Each loss is a mean over 4 views x 12 masked
    patches x 48 values; reassociating such a reduction changes it by about log2(2304) = 11 roundings of
    6e-8 relative, and three SGD steps carry that through the weights: rtol 1e-5 leaves a margin of
    about ten. Predictions must be equal."""
    assert_matches_recorded(compiled_cpu_results, 'single_crop', rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_compiled_step_equals_the_default_trainer_on_cuda(test_folder):
    """TF32 against TF32: both runs round matrix inputs to 10-bit mantissas (about 5e-4 relative) in
    kernels that sum in different orders, so losses agree to about 1e-3 relative."""
    from engine_run import set_precision
    set_precision('cuda', strict_fp32=False)
    items = items_of(test_folder, raw=False, device='cuda')
    eager = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True).cuda(), ttt_args(), 'cuda'), items))
    args = ttt_args('--compile', '--parallel_images', '3')
    fast = stacked(adapt_all(FastTrainer(tiny_model(norm_pix_loss=True).cuda(), args, 'cuda', k=3), items))
    assert np.array_equal(fast['pred'], eager['pred'])
    np.testing.assert_allclose(fast['mae_loss'], eager['mae_loss'], rtol=1e-3)
    np.testing.assert_allclose(fast['ce_loss'], eager['ce_loss'], rtol=1e-3, atol=1e-4)


def test_rows_are_reset_and_each_is_its_image_adapted_weights(test_folder):
    items = items_of(test_folder, raw=False)[:3]
    model = tiny_model(norm_pix_loss=True)
    start = copy.deepcopy(model.state_dict())
    trainer = FastTrainer(model, ttt_args('--parallel_images', '3'), 'cpu', k=3)
    adapt_all(trainer, items)
    assert all(torch.equal(start[n], v) for n, v in model.state_dict().items())  # the model keeps the start weights
    one = ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu')
    adapt_all(one, items[1:2])
    for name, weight in adapted(trainer, 1).items():
        torch.testing.assert_close(weight, adapted(one)[name], rtol=1e-4, atol=1e-6)
    assert any(v.any() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    trainer.reset()
    assert torch.equal(trainer.flat, trainer.start)
    assert all(not torch.count_nonzero(v) for s in trainer.optimizer.state.values() for v in s.values())
    assert not torch.count_nonzero(trainer.flat.grad)


def test_mode_dependent_models_are_refused():
    model = tiny_model()
    model.blocks[0].attn.attn_drop.p = 0.1
    with pytest.raises(UserError, match='blocks.0.attn.attn_drop'):
        FastTrainer(model, ttt_args('--parallel_images', '2'), 'cpu', k=2)


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
    trainer = FastTrainer(tiny_model(norm_pix_loss=True), ttt_args('--parallel_images', str(k)), 'cpu', k=k)
    for m in trainer.model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused_attention
    items = items_of(test_folder, raw=False)[:k]
    images = torch.stack([image for _, _, image, _ in items])
    views = training_views(images, [None] * len(images), None, trainer.args)
    masks = torch.stack([ttt.image_masks(trainer.args, index, 16, 'cpu') for index, *_ in items], dim=2)
    # the per-call inputs only: views and masks of one micro-batch, the images to classify
    assert len(graph_inputs_copied_per_call(trainer._losses, views[0], masks[0, 0])) == 2
    assert len(graph_inputs_copied_per_call(trainer._logits, images)) == 1


@pytest.mark.parametrize('k', [1, 3])
def test_no_recompile_across_images_padded_groups_micro_batches_and_resets(test_folder, k):
    args = ttt_args('--parallel_images', str(k), '--accum_iter', '2', '--optimizer_type', 'adam_w')
    trainer = FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=k)
    torch._dynamo.reset()
    # the dynamo front end of --compile (its guards decide recompiles), with a cheap back end
    trainer._losses, trainer._logits = (torch.compile(f, backend='aot_eager', fullgraph=True, dynamic=False)
                                        for f in (trainer._losses, trainer._logits))
    items = items_of(test_folder, raw=False)[:k + 1]  # a full group, then one padded
    adapt_all(trainer, items[:k])
    with torch.compiler.set_stance('fail_on_recompile'):
        adapt_all(trainer, items)
        trainer.reset()
        adapt_all(trainer, items[:1])


def test_weights_gradients_and_optimizer_state_stay_where_a_graph_reads_them(test_folder):
    trainer = FastTrainer(tiny_model(norm_pix_loss=True), ttt_args('--optimizer_type', 'adam_w'), 'cpu', k=3)
    addresses = lambda: [trainer.flat.data_ptr(), trainer.flat.grad.data_ptr()] + \
        [t.data_ptr() for s in trainer.optimizer.state.values() for t in s.values()]
    before = addresses()
    assert len(before) == 5  # weights, gradients, Adam's step and two moments
    adapt_all(trainer, items_of(test_folder, raw=False)[:3])
    trainer.reset()
    assert addresses() == before
