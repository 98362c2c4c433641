"""Shared fixtures: a tiny model, tiny image folders and checkpoints in the released layouts."""
import contextlib
import importlib
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

if os.environ.get('PYTEST_XDIST_WORKER'):  # one thread per test process: two on two cores, not four
    os.environ['OMP_NUM_THREADS'] = '1'
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models_mae import build_model  # noqa: E402
from util.cli import run_main  # noqa: E402

TINY = 'mae_vit_micro_patch4'  # 16x16 images, patch 4, 2 blocks of 32-d


def cxx_compiler():
    """The C++ compiler torch.compile builds CPU kernels with ($CXX, g++, c++ or clang++), or None."""
    import shutil
    return next((shutil.which(c) for c in (os.environ.get('CXX'), 'g++', 'c++', 'clang++') if c and shutil.which(c)),
                None)


# --compile on the CPU builds its kernels with a C++ compiler: a machine without one skips these, saying so
# (.ci/run requires one, so that CI always runs them)
needs_compiler = pytest.mark.skipif(cxx_compiler() is None, reason='--compile on the CPU needs a C++ compiler (g++, '
                                                                    'clang++ or $CXX); none found')


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped, saying why, on machines without a CUDA GPU (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (run: python -m pytest -m cuda tests on one)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_global_torch_state():
    """Every test leaves the process as it found it: a script run in-process (or a test) that turns on
    TF32, deterministic algorithms, another thread count or default dtype would otherwise change every
    test after it."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    threads, dtype, precision = torch.get_num_threads(), torch.get_default_dtype(), torch.get_float32_matmul_precision()
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = flags
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_float32_matmul_precision(precision)


def make_image_folder(root, classes, per_class, size=16, seed=0):
    """Class c: noise plus a bright square whose position depends on c (so classes separate)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            r, q = divmod(c % 4, 2)
            half = size // 2
            img[r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
            Image.fromarray(img).save(os.path.join(root, name, f'img_{i:03d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """train/ and val/ with 2 classes (16 and 8 images each); a horizontal flip swaps them, so
    probing tests use color_folder."""
    root = tmp_path_factory.mktemp('data')
    make_image_folder(root / 'train', ['class_a', 'class_b'], 16, seed=0)
    make_image_folder(root / 'val', ['class_a', 'class_b'], 8, seed=1)
    return str(root)


def tiny_model(head_type='vit_head', num_classes=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(TINY, head_type=head_type, num_classes=num_classes, **kwargs)


@pytest.fixture(scope='session')
def checkpoints(tmp_path_factory):
    """An MAE checkpoint (encoder + decoder) and a probe checkpoint (encoder + classifier*, and its two
    classes class_a, class_b as main_prob.py records them) of a randomly initialised tiny model, in the
    layouts of the released files."""
    root = tmp_path_factory.mktemp('ckpt')
    state = tiny_model(num_classes=2).state_dict()
    mae = {k: v for k, v in state.items() if not k.startswith('classifier')}
    probe = {k: v for k, v in state.items() if not k.startswith(('decoder', 'mask_token'))}
    torch.save({'model': mae}, root / 'mae.pth')
    torch.save({'model': probe, 'epoch': 3, 'classes': ['class_a', 'class_b']}, root / 'probe.pth')
    return str(root / 'mae.pth'), str(root / 'probe.pth')


@pytest.fixture(scope='session')
def imagenet_checkpoints(tmp_path_factory):
    """The tiny model with a 1000-class head, saved as the released files are: a probe with no class list."""
    root = tmp_path_factory.mktemp('ckpt1000')
    state = tiny_model(num_classes=1000).state_dict()
    torch.save({'model': {k: v for k, v in state.items() if not k.startswith('classifier')}}, root / 'mae.pth')
    torch.save({'model': {k: v for k, v in state.items() if not k.startswith(('decoder', 'mask_token'))}},
               root / 'probe.pth')
    return str(root / 'mae.pth'), str(root / 'probe.pth')


def run_script(args, env=None, check=True, timeout=300):
    """Run a command from the repository root, as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    result = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_inprocess(args, check=True):
    """Run a script's command ([python, script.py, flags...]) in this process, as its __main__ block does:
    a faster stand-in for run_script where no launcher, signal or kill is involved. One thread, as
    run_script's OMP_NUM_THREADS=1, so results are bitwise those of a subprocess; Python warnings are
    recorded into the returned stderr."""
    module = importlib.import_module(os.path.splitext(os.path.basename(args[1]))[0])
    out, err, threads, code = io.StringIO(), io.StringIO(), torch.get_num_threads(), 0
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            try:
                run_main(module.main, module.get_args_parser().parse_args(args[2:]))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    result = subprocess.CompletedProcess(args, code, out.getvalue(),
                                         err.getvalue() + ''.join(f'{w.category.__name__}: {w.message}\n'
                                                                  for w in caught))
    if check and code != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def torchrun(nproc, script_args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            *script_args]


def make_color_folder(root, classes, per_class, size=16, seed=0):
    """Class c: noise with channel c % 3 raised. Unlike make_image_folder's quadrants (which a
    horizontal flip swaps between classes 0 and 1), colour survives random crops and flips."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 100, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += 150
            Image.fromarray(img).save(os.path.join(root, name, f'img_{i:03d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def color_folder(tmp_path_factory):
    """train/ and val/ with 2 classes separable under the training augmentations (16 and 8 images each)."""
    root = tmp_path_factory.mktemp('color_data')
    make_color_folder(root / 'train', ['class_a', 'class_b'], 16, seed=0)
    make_color_folder(root / 'val', ['class_a', 'class_b'], 8, seed=1)
    return str(root)


def check_error_line(returncode, stdout, stderr, fragments):
    lines = stderr.splitlines()
    assert returncode == 2, stdout[-2000:] + stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith('error: ')
    assert 'Traceback' not in stderr + stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def user_error(capfd):
    """Run a command's script in this process, as its __main__ block does."""
    def run(command, *fragments):
        script = importlib.import_module(os.path.splitext(command[1])[0])
        args = script.get_args_parser().parse_args(command[2:])
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(script.main, args)
        out, err = capfd.readouterr()
        return check_error_line(e.value.code, out, err, fragments)
    return run
