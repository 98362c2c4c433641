"""main_test_time_training.py run as a user does: outputs, step 0 against the baseline, processes,
kills, signals, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (REPO, TINY, check_error_line, make_image_folder, run_inprocess, run_script, tiny_model,
                      torchrun)
from test_collect_results import collect
from util.datasets import ImageFolder
from util.records import ResultStore

TTT = ('--batch_size', '4', '--steps_per_example', '3', '--single_crop', '--norm_pix_loss', '--blr', '0.5')


def script_args(script, checkpoints, data, out, *extra):
    mae, probe = checkpoints
    return [sys.executable, script, '--data_path', data, '--model', TINY, '--resume_model', mae,
            '--resume_finetune', probe, '--num_classes', '2', '--dataset_name', 'folder',
            '--output_dir', str(out), '--num_workers', '0', '--device', 'cpu', *extra]


def ttt_command(checkpoints, data, out, *extra):
    return script_args('main_test_time_training.py', checkpoints, data, out, *TTT, *extra)


def per_image(out):
    with np.load(os.path.join(out, 'per_image.npz')) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def test_folder(tmp_path):
    return make_image_folder(tmp_path / 'test', ['class_a', 'class_b'], 5, seed=3)


@pytest.fixture(scope='module')
def one_run(checkpoints, tmp_path_factory):
    """TTT and the baseline, one process each, on a 10-image folder; other tests compare with them."""
    root = tmp_path_factory.mktemp('one_run')
    data = make_image_folder(root / 'test', ['class_a', 'class_b'], 5, seed=3)
    command = ttt_command(checkpoints, data, root / 'ttt', '--print_freq', '4')
    result = run_script(command)
    run_inprocess(script_args('test_without_adaptation.py', checkpoints, data, root / 'b'))
    return data, root, command, result


def test_outputs_and_step0_equals_the_baseline(one_run):
    data, root, _, result = one_run
    ttt, base = per_image(root / 'ttt'), per_image(root / 'b')
    assert ttt['pred'].shape == (10, 4) and ttt['mae_loss'].shape == (10, 3)
    assert np.array_equal(ttt['pred'][:, 0], base['pred'][:, 0])
    np.testing.assert_allclose(ttt['ce_loss'][:, 0], base['ce_loss'][:, 0], rtol=1e-5)
    assert list(ttt['filename']) == [os.path.relpath(p, data) for p, _ in ImageFolder(data).samples]

    results = json.load(open(root / 'ttt' / 'results.json'))
    assert results['complete'] and results['num_images'] == 10 and results['method'] == 'ttt'
    # on a CPU: its model name where the system says it, and the process's peak resident memory
    assert results['device'] not in ('', 'x86_64', 'cpu') or not os.path.exists('/proc/cpuinfo')
    assert 0.1 < results['peak_memory_gib'] < 64 and results['peak_memory'].startswith('resident')
    assert results['accuracy_per_step'][0] == json.load(open(root / 'b' / 'results.json'))['accuracy']
    assert results['accuracy_per_step'] == (100 * (ttt['pred'] == ttt['label'][:, None]).mean(0)).tolist()
    lines = open(root / 'ttt' / 'accuracy.txt').read().splitlines()
    assert lines[0].startswith('Namespace(') and len(lines) == 4  # released: line i is after i + 1 steps
    assert [x.split('\t') for x in lines[1:]] == [[str(i), str(a)] for i, a in
                                                  enumerate(results['accuracy_per_step'][1:])]
    # progress: images done, rate and time left, every --print_freq images and at the end
    progress = [line for line in result.stdout.splitlines() if line.startswith('[')]
    assert [line.split(']')[0] for line in progress] == ['[4/10', '[8/10', '[10/10']
    assert all('images/s' in line and 'left' in line for line in progress)
    assert 'Warning' not in result.stdout + result.stderr
    acc = EventAccumulator(str(root / 'ttt'))
    acc.Reload()
    assert [e.value for e in acc.Scalars('ttt/accuracy_per_step')] == pytest.approx(results['accuracy_per_step'])


def test_parallel_images_runs_the_same_images(one_run, checkpoints, tmp_path):
    data, root, _, _ = one_run
    result = run_inprocess(ttt_command(checkpoints, data, tmp_path / 'four', '--parallel_images', '4'))
    one, four = per_image(root / 'ttt'), per_image(tmp_path / 'four')
    assert np.array_equal(one['index'], four['index']) and np.array_equal(one['pred'], four['pred'])
    np.testing.assert_allclose(one['mae_loss'], four['mae_loss'], rtol=1e-4)
    assert 'Warning' not in result.stdout + result.stderr  # vmap's fallback notice is expected and silenced


def test_two_processes_equal_one_and_a_rerun_redoes_nothing(one_run, checkpoints, tmp_path):
    data, root, command, _ = one_run
    run_script(torchrun(2, ttt_command(checkpoints, data, tmp_path / 'two')[1:]))
    one, two = per_image(root / 'ttt'), per_image(tmp_path / 'two')
    for key in ('index', 'label', 'pred', 'ce_loss', 'mae_loss', 'filename'):
        assert np.array_equal(one[key], two[key]), key
    assert not os.path.exists(tmp_path / 'two' / 'partial')
    rerun = run_inprocess(command)
    assert 'already done' in rerun.stdout


@pytest.mark.cuda
def test_torchrun_on_cuda_equals_a_plain_cuda_run(checkpoints, test_folder, tmp_path):
    """A process launched by torchrun computes on the GPU as a plain one does (one process: no process
    group, so no NCCL, which needs a GPU per process). Masks come from a generator on the device, so a
    run that fell back to the CPU would differ."""
    run_script(ttt_command(checkpoints, test_folder, tmp_path / 'plain', '--device', 'cuda'))
    run_script(torchrun(1, ttt_command(checkpoints, test_folder, tmp_path / 'launched', '--device', 'cuda')[1:]))
    plain, launched = per_image(tmp_path / 'plain'), per_image(tmp_path / 'launched')
    assert np.array_equal(plain['pred'], launched['pred'])
    np.testing.assert_allclose(plain['mae_loss'], launched['mae_loss'], rtol=1e-4)


def kill_after_flushes(command, output_dir, flushes):
    """Start command and kill -9 it once it has flushed `flushes` partial result files."""
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = output_dir / 'partial'
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob('*.npz')) if partial.exists() else []) < flushes:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results = output_dir / 'results.json'
    assert not results.exists() or not json.loads(results.read_text())['complete'], 'the run finished first'


TIMINGS = ('wall_time_s', 'images_per_s', 'seconds_per_image', 'device_seconds',  # measured, in results.json
           'peak_memory_gib')  # (per_image.npz: 'seconds')


@pytest.mark.slow
def test_killed_run_shows_partial_results_and_resumes_to_the_uninterrupted_files(checkpoints, tmp_path):
    """After a kill -9, the readable outputs hold the images flushed so far, marked partial, and the
    collector shows them as such; the rerun ends with the files of an uninterrupted run."""
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 12, seed=5)
    slow = ('--batch_size', '16', '--steps_per_example', '25', '--flush_every', '1')
    out = tmp_path / 'sweep' / 'gaussian_noise'  # the same folder for both runs: the same args line
    command = ttt_command(checkpoints, data, out, *slow)
    run_inprocess(command)
    full = tmp_path / 'full'
    out.rename(full)
    kill_after_flushes(command, out, 3)

    # Each readable file holds the first n images (one process adapts them in order) for its own n: a
    # rewrite may skip a flush (it waits 20 times its duration) and the kill may fall between two files.
    done = ResultStore(str(out)).load()  # every flushed record
    flushed = len(done['index'])
    assert 3 <= flushed < 24

    def accuracy(n):
        return 100 * (done['pred'][:n, -1] == done['label'][:n]).mean()
    shown = json.loads((out / 'results.json').read_text())
    n = shown['num_images']
    assert not shown['complete'] and shown['num_images_expected'] == 24 and 1 <= n <= flushed
    assert shown['accuracy_per_step'][-1] == accuracy(n)
    *_, last_step, marker = (out / 'accuracy.txt').read_text().splitlines()
    n_txt = int(marker.split()[1])
    assert marker == f'partial: {n_txt} of 24 images' and last_step == f"24\t{accuracy(n_txt)}"
    snapshot = per_image(out)
    assert 1 <= len(snapshot['index']) <= flushed and snapshot['num_images_expected'] == 24
    assert np.array_equal(snapshot['pred'], done['pred'][:len(snapshot['index'])])
    table = collect(tmp_path / 'sweep').stdout
    assert f'| {accuracy(n):.1f}* |' in table.splitlines()[3]  # the TTT row
    assert f'* partial: TTT-MAE (step 25), gaussian_noise: {n}/24 images' in table

    resumed = run_inprocess(command)
    assert 'already done' in resumed.stdout and not (out / 'partial').exists()
    assert (out / 'accuracy.txt').read_bytes() == (full / 'accuracy.txt').read_bytes()
    a, b = (json.loads((d / 'results.json').read_text()) for d in (out, full))
    assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    a, b = per_image(out), per_image(full)
    assert list(a) == list(b) and 'num_images_expected' not in a
    for key in b:
        assert key == 'seconds' or (a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])), key


@pytest.mark.parametrize('workers', [0, 2])  # 2: the signal goes to the whole group, loader workers too
def test_sigterm_flushes_and_exits(checkpoints, tmp_path, workers):
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 12, seed=5)
    cmd = ttt_command(checkpoints, data, tmp_path / 'out', '--batch_size', '16', '--steps_per_example', '25',
                      '--flush_every', '1000', '--print_freq', '1')
    cmd[cmd.index('--num_workers') + 1] = str(workers)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while not proc.stdout.readline().startswith('[1/24]'):  # the first image is done
        assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C or SLURM's scancel do
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert 'rerun the same command' in out
    chunks = list((tmp_path / 'out' / 'partial').glob('*.npz'))
    assert len(chunks) == 1  # flushed on the signal although --flush_every was not reached


def test_an_unreadable_image_stops_the_run_and_keeps_the_images_before_it(checkpoints, tmp_path):
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 3, seed=5)
    bad = os.path.join(data, 'class_b', 'img_001.png')
    with open(bad, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
    result = run_inprocess(ttt_command(checkpoints, data, tmp_path / 'out', '--flush_every', '1'), check=False)
    check_error_line(result.returncode, result.stdout, result.stderr, ['img_001.png'])
    done = sum(len(np.load(p)['index']) for p in (tmp_path / 'out' / 'partial').glob('*.npz'))
    assert done == 4  # the images before the bad one are kept


def test_the_released_flags_verbose_and_no_single_crop(checkpoints, test_folder, tmp_path):
    """--verbose prints the released per-step lines; --no_single_crop (after --single_crop here) chooses
    random resized crops."""
    out = tmp_path / 'o'
    result = run_inprocess(ttt_command(checkpoints, test_folder, out, '--max_examples', '2', '--verbose',
                                       '--no_single_crop'))
    assert json.loads((out / 'results.json').read_text())['args']['single_crop'] is False
    records, expected = per_image(out), []
    for index, mae, ce in zip(records['index'], records['mae_loss'], records['ce_loss']):
        for step in range(3):
            expected += [f'datapoint {index} iter {step}: rec_loss {mae[step]}',
                         f'datapoint {index} iter {step}: class_loss {ce[step + 1]}']
    assert [line for line in result.stdout.splitlines() if line.startswith('datapoint')] == expected


def test_changed_settings_in_the_same_folder_are_refused(user_error, checkpoints, test_folder, tmp_path):
    run_inprocess(ttt_command(checkpoints, test_folder, tmp_path / 'o', '--max_examples', '2'))
    user_error(ttt_command(checkpoints, test_folder, tmp_path / 'o', '--max_examples', '2',
                           '--steps_per_example', '5'), 'steps_per_example')


def test_non_finite_loss_names_the_image(checkpoints, test_folder, tmp_path):
    result = run_inprocess(ttt_command(checkpoints, test_folder, tmp_path / 'o', '--lr', '1e30'), check=False)
    check_error_line(result.returncode, result.stdout, result.stderr, ['non-finite', 'class_a'])


def test_bad_checkpoints(user_error, checkpoints, test_folder, tmp_path):
    mae, probe = checkpoints
    user_error(ttt_command((mae, str(tmp_path / 'nope.pth')), test_folder, tmp_path / 'o'),
               'probe checkpoint', 'nope.pth')
    user_error(ttt_command(checkpoints, test_folder, tmp_path / 'o', '--classifier_depth', '2'),
               'missing keys', 'classifier_blocks.1.')
    user_error(ttt_command((probe, probe), test_folder, tmp_path / 'o'),
               'missing keys', 'decoder_blocks.0.attn.proj.bias')
    assert not (tmp_path / 'o').exists()  # nothing is created before the inputs are checked


def test_imagenet_r_predictions_stay_among_its_200_classes(imagenet_checkpoints, tmp_path):
    """A 1000-class head (a released probe records no classes: ImageNet's) on an ImageNet-R-style folder:
    the baseline and every TTT classification choose among the set's 200 classes."""
    from util.datasets import imagenet_subset, imagenet_wnids
    wnids, subset = imagenet_wnids(), imagenet_subset('imagenet_r')
    data = make_image_folder(tmp_path / 'r', [wnids[subset[3]], wnids[subset[150]]], 3, seed=4)
    mae, probe = imagenet_checkpoints
    for script, out, extra in (('test_without_adaptation.py', 'b', ()), ('main_test_time_training.py', 't', TTT)):
        command = script_args(script, imagenet_checkpoints, data, tmp_path / out, '--dataset_name', 'imagenet_r', *extra)
        command[command.index('--num_classes') + 1] = '1000'
        run_inprocess(command)
        records = per_image(tmp_path / out)
        assert set(records['label'].tolist()) == {subset[3], subset[150]}
        assert set(records['pred'].ravel().tolist()) <= set(subset)


def test_subset_file_selects_exactly_the_listed_images(checkpoints, test_folder, tmp_path, user_error):
    names = [os.path.relpath(p, test_folder) for p, _ in ImageFolder(test_folder).samples]
    listed = tmp_path / 'list.txt'
    listed.write_text('\n'.join([names[7], names[2], names[4]]) + '\n')
    run_inprocess(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'b',
                           '--subset_file', str(listed)))
    assert per_image(tmp_path / 'b')['index'].tolist() == [2, 4, 7]
    selection = json.load(open(tmp_path / 'b' / 'results.json'))['selection']
    assert selection['images'] == 3 and selection['subset_file'] == str(listed)
    listed.write_text(f'{names[1]}\nclass_a/nope.png\nclass_b/gone.png\n')
    user_error(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'c',
                           '--subset_file', str(listed)), '2 of the 3 images', 'class_a/nope.png, class_b/gone.png')
    user_error(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'c',
                           '--subset_file', str(listed), '--max_examples', '2'), '--subset_file and --max_examples')
    user_error(script_args('test_without_adaptation.py', checkpoints, test_folder, tmp_path / 'c',
                           '--subset', 'random'), '--subset and --subset_seed', 'pass --max_examples')


ONLINE = ('--online_window', '3', '--batch_size', '6', '--steps_per_example', '2', '--single_crop',
          '--lr', str(0.5 * 6 / 256), '--flush_every', '1')


# the remedies against drift, all at once: a periodic reset, a pull toward the loaded weights, stochastic
# restore, an average of the weights that classifies
REMEDIES = ('--online_reset_every', '7', '--online_anchor', '0.5', '--online_restore', '0.01', '--online_keep_optimizer',
            '--online_ema', '0.9')


@pytest.mark.slow
@pytest.mark.parametrize('remedies', [(), REMEDIES])
def test_online_stream_killed_and_resumed_equals_uninterrupted(checkpoints, tmp_path, remedies):
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 30, seed=6)
    run_inprocess(script_args('main_online_ttt.py', checkpoints, data, tmp_path / 'full', *ONLINE, *remedies))
    killed = script_args('main_online_ttt.py', checkpoints, data, tmp_path / 'killed', *ONLINE, *remedies)
    kill_after_flushes(killed, tmp_path / 'killed', 8)
    # killed between a save and the flush of its results, or after: the state they end at, and at most the next
    states = sorted((tmp_path / 'killed' / 'online').glob('*.pt'))
    assert 1 <= len(states) <= 2
    resumed = run_inprocess(killed)
    assert 'already done' in resumed.stdout
    full, again = per_image(tmp_path / 'full'), per_image(tmp_path / 'killed')
    for key in ('index', 'pred', 'ce_loss', 'mae_loss', 'position', 'weight_distance'):
        assert np.array_equal(full[key], again[key]), key
    order = full['index'][np.argsort(full['position'])]
    assert sorted(order.tolist()) == list(range(60)) and order.tolist() != list(range(60))  # a shuffled stream
    assert not (tmp_path / 'killed' / 'online').exists() and not (tmp_path / 'full' / 'online').exists()  # complete:
    # a finished stream is never continued, so its states (GiBs per process for a ViT) are gone
    if not remedies:  # the same folder under two processes would run two streams over other images: refused
        result = run_script(torchrun(2, killed[1:]), check=False)
        assert result.returncode != 0 and 'online_processes: 1 -> 2' in result.stderr  # torchrun exits 1


@pytest.mark.parametrize('k', ['1', '3'])  # the model's own weights (the default loop), and flat weights
def test_reconstructions_are_written_for_the_first_images(one_run, checkpoints, tmp_path, k):
    from PIL import Image
    data, _, _, _ = one_run
    run_inprocess(ttt_command(checkpoints, data, tmp_path / 'r', '--save_reconstructions', '2', '--parallel_images', k))
    pictures = sorted((tmp_path / 'r' / 'reconstructions').glob('*.png'))
    assert [p.name for p in pictures] == ['000000_img_000.png', '000001_img_001.png']
    with Image.open(pictures[0]) as picture:
        assert picture.format == 'PNG' and picture.width > 4 * picture.height / 2  # a row of panels
        assert len(np.unique(np.asarray(picture.convert('L')))) > 20  # images, not a blank page


def test_other_checkpoints_of_the_same_name_are_refused(checkpoints, test_folder, tmp_path, user_error):
    """The settings record each checkpoint's SHA-256: a rerun with another checkpoint-final.pth (another
    pre-training) does not continue into the old results (before, only the file names were recorded)."""
    mae, probe = checkpoints
    own = tmp_path / 'pretrain'
    own.mkdir()
    shutil.copy(mae, own / 'checkpoint-final.pth')
    run_inprocess(ttt_command((str(own / 'checkpoint-final.pth'), probe), test_folder, tmp_path / 'o', '--max_examples', '2'))
    other = tiny_model(num_classes=2, seed=9).state_dict()
    torch.save({'model': {k: v for k, v in other.items() if not k.startswith('classifier')}},
               own / 'checkpoint-final.pth')
    line = user_error(ttt_command((str(own / 'checkpoint-final.pth'), probe), test_folder, tmp_path / 'o',
                                  '--max_examples', '2'), 'resume_model_sha256')
    assert str(own / 'checkpoint-final.pth') in line


# the paper's recipe, given to the online script explicitly (the lr: TTT's blr 0.5 * 4 views / 256)
EPISODIC_RECIPE = ('--optimizer_type', 'sgd', '--finetune_mode', 'encoder', '--encoder_lr_scale', '1', '--clip_grad', '0',
                   '--online_window', '1', '--lr', str(0.5 * 4 / 256))


def test_online_with_a_reset_before_every_image_is_episodic_and_records_its_drift(checkpoints, tmp_path):
    """--online_reset_every 1 (and the default fresh optimiser state per image): every image starts from
    the loaded weights, as episodic TTT-MAE, so the results are those of an episodic run, bit for bit."""
    data = make_image_folder(tmp_path / 'data', ['class_a', 'class_b'], 6, seed=6)
    run_inprocess(script_args('main_test_time_training.py', checkpoints, data, tmp_path / 'episodic', *TTT))
    run_inprocess(script_args('main_online_ttt.py', checkpoints, data, tmp_path / 'online',
                              *[f for f in TTT if f not in ('--blr', '0.5')], '--online_reset_every', '1', *EPISODIC_RECIPE))
    episodic, online = per_image(tmp_path / 'episodic'), per_image(tmp_path / 'online')
    order = np.argsort(online['index'])
    for key in ('index', 'pred', 'ce_loss', 'mae_loss'):
        assert np.array_equal(episodic[key], online[key][order]), key
    assert np.all(online['weight_distance'] > 0)  # each image's own steps, from the loaded weights
    drift = json.loads((tmp_path / 'online' / 'results.json').read_text())['drift']
    assert drift['first_position'] == [0] and drift['weight_distance'] == [pytest.approx(online['weight_distance'].mean())]
    assert drift['accuracy_last_step'] == [100 * np.mean(online['pred'][:, -1] == online['label'])]
    assert 'drift' not in json.loads((tmp_path / 'episodic' / 'results.json').read_text())


def test_a_second_loss_is_recorded_by_name_in_every_output(checkpoints, test_folder, tmp_path):
    """A model registered with a second test-time loss (tests/test_engine_test_time.py's, in a few lines):
    the run minimises both and writes each per image and step, in results.json and in TensorBoard."""
    from models_mae import MODELS, register_model
    from test_engine_test_time import WithTotalVariation

    @register_model
    def micro_with_tv(**kwargs):
        return WithTotalVariation(**{**MODELS[TINY].sizes, **kwargs})
    try:
        command = ttt_command(checkpoints, test_folder, tmp_path / 'tv', '--max_examples', '4')
        command[command.index('--model') + 1] = 'micro_with_tv'
        run_inprocess(command)
    finally:
        del MODELS['micro_with_tv']
    records = per_image(tmp_path / 'tv')
    assert records['tv_loss'].shape == records['mae_loss'].shape == (4, 3) and np.all(records['tv_loss'] > 0)
    results = json.loads((tmp_path / 'tv' / 'results.json').read_text())
    assert results['tv_loss_per_step'] == pytest.approx(records['tv_loss'].mean(0).tolist())
    acc = EventAccumulator(str(tmp_path / 'tv'))
    acc.Reload()
    assert [e.value for e in acc.Scalars('ttt/tv_loss_per_step')] == pytest.approx(results['tv_loss_per_step'])
    assert [e.value for e in acc.Scalars('ttt/mae_loss_per_step')] == pytest.approx(results['mae_loss_per_step'])
