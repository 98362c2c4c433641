"""Test-time training and the baseline: the loop's math, equivalence of the fast paths, sharding, resume."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, check_error_line, make_image_folder, run_script, tiny_model, torchrun
from bench.naive_ttt import naive_adapt
import engine_test_time as ttt
from main_test_time_training import get_args_parser
from util.checkpoint import combined_state_dict
from util.cli import UserError
from util.datasets import ImageFolder, eval_transform, imagenet_wnids, load_rgb


def ttt_args(*extra):
    args = get_args_parser().parse_args(
        ['--data_path', 'unused', '--resume_model', 'm', '--resume_finetune', 'p', '--model', TINY,
         '--batch_size', '4', '--steps_per_example', '3', '--single_crop', '--norm_pix_loss',
         '--num_classes', '2', '--lr', '0.05', *extra])
    args.input_size = 16
    return args


# CUDA variants run where a GPU is (bench/gpu_checks.sh); CI has none and skips them
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA')
DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]


@pytest.fixture
def test_folder(tmp_path):
    return make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 5, seed=3)


def eval_image(path):
    return eval_transform(16)(load_rgb(path)).unsqueeze(0)


def test_reset_restores_start_weights_and_adaptation_touches_only_the_encoder(test_folder):
    model = tiny_model(norm_pix_loss=True)
    start = copy.deepcopy(model.state_dict())
    trainer = ttt.TestTimeTrainer(model, ttt_args(), 'cpu')
    samples = ImageFolder(test_folder).samples
    for index in range(3):
        path, label = samples[index]
        trainer.adapt(index, label, eval_image(path))
        state = model.state_dict()
        changed = {k for k in start if not torch.equal(start[k], state[k])}
        assert 'blocks.0.attn.qkv.weight' in changed and 'cls_token' in changed
        assert not any(k.startswith(('decoder', 'classifier')) or k.endswith('pos_embed') for k in changed)
        trainer.reset()
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
        assert not trainer.optimizer.state and all(p.grad is None for p in trainer.params)


def test_two_steps_equal_hand_computed_sgd_with_momentum(test_folder):
    args = ttt_args('--steps_per_example', '2')
    model = tiny_model(norm_pix_loss=True)
    reference = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model, args, 'cpu')
    path, label = ImageFolder(test_folder).samples[0]
    image = eval_image(path)
    trainer.adapt(7, label, image)

    masks = trainer.masks(7)
    names = [n for n, p in reference.named_parameters() if p.requires_grad
             and not n.startswith(('decoder', 'classifier'))]
    params = dict(reference.named_parameters())
    buffers = {}
    for step in range(2):
        loss = reference(image.expand(4, -1, -1, -1), mask_ratio=0.75, input_mask=masks[step, 0])[0]['mae']
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                buffers[n] = g if step == 0 else 0.9 * buffers[n] + g  # SGD momentum, no dampening
                params[n] -= args.lr * buffers[n]
    adapted = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(adapted[n], params[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adam_w'])
def test_multi_tensor_optimizer_is_bitwise_the_per_parameter_one(test_folder, optimizer):
    """build_optimizer's foreach update == torch's default per-parameter loop on CPU, bit for bit."""
    args = ttt_args('--optimizer_type', optimizer, '--steps_per_example', '4')
    path, label = ImageFolder(test_folder).samples[0]
    assert ttt.TestTimeTrainer(tiny_model(), args, 'cpu').optimizer.defaults['foreach'] is True
    adapted = []
    for foreach in (True, None):
        model = tiny_model(norm_pix_loss=True)
        trainer = ttt.TestTimeTrainer(model, args, 'cpu')
        trainer.optimizer = ttt.build_optimizer(trainer.params, args, foreach=foreach)
        assert trainer.optimizer.defaults['foreach'] is foreach
        trainer.adapt(0, label, eval_image(path))
        adapted.append([p.detach().clone() for p in trainer.params])
    assert all(torch.equal(a, b) for a, b in zip(*adapted))
    assert not torch.equal(adapted[0][0], trainer.start_params[0])  # the weights did move


@pytest.mark.parametrize('device', DEVICES)
def test_fast_loop_equals_naive_loop(test_folder, device):
    """In-place reset + decode once + multi-tensor update == deep-copy the model, new per-parameter
    optimiser, decode every step."""
    args = ttt_args('--accum_iter', '2')
    model = tiny_model(norm_pix_loss=True)
    base_cpu = copy.deepcopy(model)
    trainer = ttt.TestTimeTrainer(model.to(device), args, device)
    for index, (path, label) in enumerate(ImageFolder(test_folder).samples[:4]):
        preds, _, losses = trainer.adapt(index, label, eval_image(path).to(device))
        ref_preds, ref_losses = naive_adapt(base_cpu, path, label, index, args, device)
        assert preds.tolist() == ref_preds
        # CUDA: the two loops run different kernels (one expanded batch against stacked copies; some
        # backward kernels sum with atomics), so float sums differ in order
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6 if device == 'cpu' else 1e-4)


def test_random_resized_crops_full_crop_is_the_image_and_seeded():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    views = ttt.random_resized_crops(image, 6, 16, gen, scale=(1, 1), ratio=(1, 1))
    normalised = eval_transform(16).transforms[-1](image.float() / 255)
    for view in views:  # the whole image, maybe flipped
        assert torch.allclose(view, normalised, atol=1e-5) or torch.allclose(view, normalised.flip(-1), atol=1e-5)
    a = ttt.random_resized_crops(image, 4, 8, torch.Generator().manual_seed(1))
    b = ttt.random_resized_crops(image, 4, 8, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, b)


def test_imagenet_wnid_subset_keeps_standard_labels(tmp_path):
    wnids = imagenet_wnids()
    chosen = [wnids[0], wnids[417], wnids[999]]
    root = make_image_folder(tmp_path / 'c', chosen, 1)
    dataset = ImageFolder(root)
    assert [label for _, label in dataset.samples] == [0, 417, 999]
    with pytest.raises(UserError, match='not ImageNet wnids'):
        ImageFolder(make_image_folder(tmp_path / 'd', ['cat', 'dog'], 1), imagenet_labels=True)
    assert [label for _, label in ImageFolder(str(tmp_path / 'd')).samples] == [0, 1]


# ---- whole scripts ----

def script_args(script, checkpoints, data, out, *extra):
    mae, probe = checkpoints
    return [sys.executable, script, '--data_path', data, '--model', TINY, '--resume_model', mae,
            '--resume_finetune', probe, '--num_classes', '2', '--dataset_name', 'tiny',
            '--output_dir', str(out), '--num_workers', '0', *extra]


TTT = ('--batch_size', '4', '--steps_per_example', '3', '--single_crop', '--norm_pix_loss', '--blr', '0.5')


def per_image(out):
    with np.load(os.path.join(out, 'per_image.npz')) as f:
        return {k: f[k] for k in f.files}


def test_step0_equals_baseline_batched_equals_one_at_a_time(checkpoints, test_folder, tmp_path):
    run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'ttt', *TTT))
    run_script(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'b1',
                           '--batch_size', '1'))
    run_script(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'b7',
                           '--batch_size', '7'))
    ttt, b1, b7 = per_image(tmp_path / 'ttt'), per_image(tmp_path / 'b1'), per_image(tmp_path / 'b7')
    assert ttt['pred'].shape == (10, 4)
    assert np.array_equal(ttt['pred'][:, 0], b1['pred'][:, 0])
    assert np.array_equal(b1['pred'], b7['pred'])
    np.testing.assert_allclose(b1['ce_loss'], b7['ce_loss'], rtol=1e-5)
    np.testing.assert_allclose(ttt['ce_loss'][:, 0], b1['ce_loss'][:, 0], rtol=1e-5)

    results = json.load(open(tmp_path / 'ttt' / 'results.json'))
    baseline = json.load(open(tmp_path / 'b7' / 'results.json'))
    assert results['complete'] and results['num_images'] == 10
    assert results['accuracy_per_step'][0] == baseline['accuracy']
    lines = open(tmp_path / 'ttt' / 'accuracy.txt').read().splitlines()
    assert lines[0].startswith('Namespace(') and len(lines) == 4  # released: line i is after i + 1 steps
    assert [x.split('\t') for x in lines[1:]] == [[str(i), str(a)] for i, a in
                                                  enumerate(results['accuracy_per_step'][1:])]
    acc, loss = map(float, open(tmp_path / 'b7' / 'accuracy.txt').read().splitlines()[1].split())
    assert acc == baseline['accuracy']
    assert np.load(tmp_path / 'b7' / 'accuracy.npy').mean() * 100 == pytest.approx(acc)
    assert list(b7['filename']) == [os.path.relpath(p, test_folder) for p, _ in ImageFolder(test_folder).samples]


def test_two_processes_equal_one_and_a_rerun_redoes_nothing(checkpoints, test_folder, tmp_path):
    run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'one', *TTT))
    run_script(torchrun(2, script_args('main_test_time_training.py', checkpoints, test_folder,
                                       tmp_path / 'two', *TTT)[1:]))
    one, two = per_image(tmp_path / 'one'), per_image(tmp_path / 'two')
    for key in ('index', 'label', 'pred', 'ce_loss', 'mae_loss', 'filename'):
        assert np.array_equal(one[key], two[key]), key
    assert not os.path.exists(tmp_path / 'two' / 'partial')
    rerun = run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'one', *TTT))
    assert 'already done' in rerun.stdout


@needs_cuda
def test_torchrun_on_cuda_equals_a_plain_cuda_run(checkpoints, test_folder, tmp_path):
    """A process launched by torchrun computes on the GPU as a plain one does (one process: no process
    group, so no NCCL, which needs a GPU per process). Masks come from a generator on the device, so a
    run that fell back to the CPU would differ."""
    run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'plain', *TTT,
                           '--device', 'cuda'))
    run_script(torchrun(1, script_args('main_test_time_training.py', checkpoints, test_folder,
                                       tmp_path / 'launched', *TTT, '--device', 'cuda')[1:]))
    plain, launched = per_image(tmp_path / 'plain'), per_image(tmp_path / 'launched')
    assert np.array_equal(plain['pred'], launched['pred'])
    np.testing.assert_allclose(plain['mae_loss'], launched['mae_loss'], rtol=1e-4)


def test_max_examples_subset(checkpoints, test_folder, tmp_path):
    run_script(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 's',
                           '--max_examples', '4'))
    assert per_image(tmp_path / 's')['index'].tolist() == [0, 2, 5, 7]  # evenly spaced over both classes


def test_killed_run_resumes_to_the_uninterrupted_result(checkpoints, tmp_path):
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 12, seed=5)
    slow = ('--batch_size', '16', '--steps_per_example', '25', '--single_crop', '--blr', '0.1',
            '--flush_every', '1')
    run_script(script_args('main_test_time_training.py', checkpoints, data, tmp_path / 'full', *slow))
    killed = script_args('main_test_time_training.py', checkpoints, data, tmp_path / 'killed', *slow)
    proc = subprocess.Popen(killed, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / 'killed' / 'partial'
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob('*.npz')) if partial.exists() else []) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'killed' / 'results.json').exists(), 'the run finished before it was killed'
    resumed = run_script(killed)
    assert 'already done' in resumed.stdout
    full, again = per_image(tmp_path / 'full'), per_image(tmp_path / 'killed')
    for key in ('index', 'pred', 'ce_loss', 'mae_loss'):
        assert np.array_equal(full[key], again[key]), key


def test_sigterm_flushes_and_exits(checkpoints, tmp_path):
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 12, seed=5)
    cmd = script_args('main_test_time_training.py', checkpoints, data, tmp_path / 'out', '--batch_size', '16',
                      '--steps_per_example', '25', '--single_crop', '--flush_every', '1000', '--print_freq', '1')
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while not proc.stdout.readline().startswith('[1/24]'):  # the first image is done
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert 'rerun the same command' in out
    chunks = list((tmp_path / 'out' / 'partial').glob('*.npz'))
    assert len(chunks) == 1  # flushed on the signal although --flush_every was not reached


def check_error(result, *fragments):
    return check_error_line(result.returncode, result.stdout, result.stderr, fragments)


def test_bad_checkpoints(user_error, checkpoints, test_folder, tmp_path):
    mae, probe = checkpoints
    user_error(script_args('main_test_time_training.py', (mae, str(tmp_path / 'nope.pth')), test_folder,
                           tmp_path / 'o', *TTT), 'probe checkpoint', 'nope.pth')
    user_error(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'o', *TTT,
                           '--classifier_depth', '2'), 'missing keys', 'classifier_blocks.1.')
    user_error(script_args('test_without_adaptation.py', (probe, probe), test_folder, tmp_path / 'o'),
               'missing keys', 'decoder_blocks.0.attn.proj.bias')
    user_error(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'o',
                           '--head_type', 'linear'), 'no linear weights')


def test_bad_folders_and_images(user_error, checkpoints, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    user_error(script_args('test_without_adaptation.py', checkpoints, str(empty), tmp_path / 'o'),
               'no class sub-folders')
    user_error(script_args('test_without_adaptation.py', checkpoints, str(tmp_path / 'missing'), tmp_path / 'o'),
               'not found')
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 3, seed=5)
    bad = os.path.join(data, 'class_b', 'img_001.png')
    with open(bad, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
    result = run_script(script_args('main_test_time_training.py', checkpoints, data, tmp_path / 'out', *TTT,
                                    '--flush_every', '1'), check=False)
    check_error(result, 'img_001.png')
    done = sum(len(np.load(p)['index']) for p in (tmp_path / 'out' / 'partial').glob('*.npz'))
    assert done == 4  # the images before the bad one are kept


def test_changed_settings_in_the_same_folder_are_refused(user_error, checkpoints, test_folder, tmp_path):
    run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'o', *TTT,
                           '--max_examples', '2'))
    user_error(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'o',
                           *TTT, '--max_examples', '2', '--steps_per_example', '5'), 'steps_per_example')


def test_non_finite_loss_names_the_image(checkpoints, test_folder, tmp_path):
    result = run_script(script_args('main_test_time_training.py', checkpoints, test_folder, tmp_path / 'o',
                                    '--batch_size', '4', '--steps_per_example', '3', '--single_crop',
                                    '--lr', '1e30'), check=False)
    check_error(result, 'non-finite', 'class_a')


def test_combined_state_dict_takes_the_head_from_the_probe(checkpoints):
    mae, probe = checkpoints
    state = combined_state_dict(mae, probe, 'vit_head')
    probe_state = torch.load(probe, weights_only=True)['model']
    assert all(torch.equal(state[k], probe_state[k]) for k in probe_state if k.startswith('classifier'))
    assert set(state) == set(tiny_model().state_dict())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('single_crop', [True, False])
def test_parallel_images_equal_one_at_a_time(test_folder, single_crop, device):
    extra = ('--accum_iter', '2', '--parallel_images', '3')
    args = ttt_args(*extra)
    args.single_crop = single_crop
    model = tiny_model(norm_pix_loss=True).to(device)
    one = ttt.TestTimeTrainer(copy.deepcopy(model), args, device)
    batched = ttt.BatchedTestTimeTrainer(model, args, device)
    items = []
    for index, (path, label) in enumerate(ImageFolder(test_folder).samples[:5]):
        raw = None if single_crop else torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
        items.append((index, label, eval_image(path).to(device), None if raw is None else raw.to(device)))
    expected = one.adapt_group(items)
    got = batched.adapt_group(items[:3]) + batched.adapt_group(items[3:])
    for (preds, ces, losses), (ref_preds, ref_ces, ref_losses) in zip(got, expected):
        assert preds.tolist() == ref_preds.tolist()
        np.testing.assert_allclose(ces, ref_ces, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)


def test_trainable_sets_do_not_depend_on_earlier_calls():
    model = tiny_model()
    encoder = {id(p) for p in ttt.trainable_parameters(model, 'encoder')}
    everything = {id(p) for p in ttt.trainable_parameters(model, 'all')}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in everything - encoder} == {n for n in names.values() if n.startswith('decoder')
                                                        and not n.endswith('pos_embed')}
    assert not any(names[i].endswith('pos_embed') or names[i].startswith('classifier') for i in everything)
    no_tokens = {names[id(p)] for p in ttt.trainable_parameters(model, 'encoder_no_cls_no_msk')}
    assert {names[i] for i in encoder} - no_tokens == {'cls_token', 'mask_token'}


def test_results_survive_a_kill_between_final_write_and_chunk_removal(tmp_path):
    from util.results import ResultStore
    store = ResultStore(str(tmp_path))
    for i in range(3):
        store.add(index=i, label=i, pred=np.array([i]), ce_loss=np.array([0.5]), mae_loss=np.zeros(0), seconds=0.)
    store.flush()
    records = store.load()
    records['filename'] = np.array(['a', 'b', 'c'])
    chunks = list((tmp_path / 'partial').glob('*.npz'))
    with open(tmp_path / 'per_image.npz', 'wb') as f:  # as finalize() does, but "killed" before removing chunks
        np.savez(f, **records)
    assert chunks and all(c.exists() for c in chunks)
    again = ResultStore(str(tmp_path)).load()
    assert again['index'].tolist() == [0, 1, 2] and again['pred'].ravel().tolist() == [0, 1, 2]


def test_a_failed_start_does_not_block_the_corrected_rerun(checkpoints, test_folder, tmp_path):
    from util.results import ResultStore, check_run_config
    store = ResultStore(str(tmp_path))
    check_run_config(store, {'lr': 0.1}, True)  # the first run died before its first image
    check_run_config(store, {'lr': 0.2}, True)  # no results yet: the new settings replace the old
    store.add(index=0, label=0, pred=np.array([0]), ce_loss=np.array([0.]), mae_loss=np.zeros(0), seconds=0.)
    store.flush()
    with pytest.raises(UserError, match='lr: 0.2 -> 0.3'):
        check_run_config(store, {'lr': 0.3}, True)


def test_slurm_without_master_address_is_a_clear_error(monkeypatch):
    from util.distributed import init_distributed_mode
    for var in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    args = ttt_args()
    args.device = 'cpu'
    with pytest.raises(UserError, match='MASTER_ADDR'):
        init_distributed_mode(args)


def test_head_weights_in_the_mae_checkpoint_are_ignored(tmp_path, checkpoints):
    """Our pre-training saves a (random, frozen) head; the probe's head must replace it whole."""
    _, probe = checkpoints
    mae_with_head = tiny_model(classifier_depth=3, seed=1).state_dict()
    torch.save({'model': mae_with_head}, tmp_path / 'mae.pth')
    state = combined_state_dict(str(tmp_path / 'mae.pth'), probe, 'vit_head')
    assert not any(k.startswith('classifier_blocks.2') for k in state)
    assert set(state) == set(tiny_model().state_dict())


def test_mode_switching_only_where_a_module_depends_on_it():
    model = tiny_model(head_type='linear', drop_path_rate=0.1)  # batch norm and drop path sit in the head only
    assert ttt.mode_dependent_modules(model) == []
    model.blocks[0].attn.attn_drop.p = 0.1
    assert ttt.mode_dependent_modules(model) == ['blocks.0.attn.attn_drop']
    assert ttt.TestTimeTrainer(model, ttt_args(), 'cpu').switch_modes
