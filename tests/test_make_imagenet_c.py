import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'make_imagenet_c.py')
CLASSES = ('n01440764', 'n01443537')


def build(*flags, **popen):
    return subprocess.run([sys.executable, SCRIPT, *map(str, flags)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **popen)


def tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture
def folder(tmp_path):
    """Two classes of three 32x32 images, in the formats an ImageFolder may hold."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i, ext in enumerate(['JPEG', 'png', 'jpg']):
            img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f'img{i}.{ext}')
    return root


def test_layout_and_identical_reruns(folder, tmp_path):
    flags = ['--data_path', folder, '--keep_size', '--corruptions', 'gaussian_noise,pixelate', '--severities', 1, 5]
    r = build(*flags, '--output_dir', tmp_path / 'a', '--workers', 2)
    assert r.returncode == 0, r.stderr
    a = tree(tmp_path / 'a')
    assert sorted(a) == sorted(f'{c}/{s}/{cls}/img{i}.JPEG' for c in ('gaussian_noise', 'pixelate')
                               for s in (1, 5) for cls in CLASSES for i in range(3))
    for name in a:
        img = Image.open(tmp_path / 'a' / name)
        assert img.format == 'JPEG' and img.size == (32, 32) and img.mode == 'RGB'
    assert a['gaussian_noise/1/n01440764/img0.JPEG'] != a['gaussian_noise/5/n01440764/img0.JPEG']

    # another run, another worker count: the same bytes
    r = build(*flags, '--output_dir', tmp_path / 'b', '--workers', 1)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / 'b') == a

    # a rerun in place skips everything and changes nothing
    r = build(*flags, '--output_dir', tmp_path / 'a', '--workers', 2)
    assert r.returncode == 0, r.stderr
    assert 'total: 0 written, 24 skipped' in r.stdout
    assert tree(tmp_path / 'a') == a

    # another --seed: other noise
    r = build(*flags, '--output_dir', tmp_path / 'c', '--seed', 1)
    c = tree(tmp_path / 'c')
    assert c['gaussian_noise/5/n01440764/img0.JPEG'] != a['gaussian_noise/5/n01440764/img0.JPEG']
    assert c['pixelate/5/n01440764/img0.JPEG'] == a['pixelate/5/n01440764/img0.JPEG']  # not random


def test_killed_run_resumes_to_the_same_tree(folder, tmp_path):
    # Official preprocessing (the 32x32 inputs become 224x224) and zoom_blur: slow enough to kill mid-way.
    flags = ['--data_path', folder, '--corruptions', 'zoom_blur', '--severities', 3, 4, 5, '--workers', 1]
    full = build(*flags, '--output_dir', tmp_path / 'full')
    assert full.returncode == 0, full.stderr
    expected = tree(tmp_path / 'full')
    assert len(expected) == 2 * 3 * 3
    assert Image.open(tmp_path / 'full' / 'zoom_blur/5/n01440764/img0.JPEG').size == (224, 224)

    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, flags), '--output_dir', str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while len(tree(out)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the pool's workers too
    proc.wait()
    partial = tree(out)
    assert 4 <= len(partial) < len(expected), 'the run was not interrupted part-way'
    for name, data in partial.items():  # what a kill leaves is either finished or a hidden temporary
        assert os.path.basename(name).startswith('.') or data == expected[name]
    # a temporary as a kill during a write would leave it
    (out / 'zoom_blur/5/n01443537').mkdir(parents=True, exist_ok=True)
    (out / 'zoom_blur/5/n01443537/.img2.JPEG.x1y2z3.tmp').write_bytes(b'half an image')

    r = build(*flags, '--output_dir', out)
    assert r.returncode == 0, r.stderr
    assert tree(out) == expected


def test_unreadable_image_is_reported_and_the_rest_written(folder, tmp_path):
    (folder / CLASSES[1] / 'broken.JPEG').write_bytes(b'this is not a JPEG' * 10)
    r = build('--data_path', folder, '--output_dir', tmp_path / 'out', '--keep_size',
              '--corruptions', 'contrast', 'fog', '--severities', 2, 3)
    assert r.returncode == 1
    assert f'unreadable image: {CLASSES[1]}/broken.JPEG' in r.stderr
    assert 'Traceback' not in r.stderr
    written = tree(tmp_path / 'out')
    assert len(written) == 2 * 2 * 6 and not any('broken' in name for name in written)
    rows = {line.split()[0]: line.split()[1:4] for line in r.stdout.splitlines() if line.startswith(('fog', 'contrast'))}
    assert rows == {'contrast': ['12', '0', '2'], 'fog': ['12', '0', '2']}  # written, skipped, failed


@pytest.mark.parametrize('case', ['missing', 'no_classes', 'no_images', 'unknown_corruption'])
def test_bad_input_is_one_line_and_exit_2(case, folder, tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'cls').mkdir(parents=True)
    data, corruption = {'missing': (tmp_path / 'nope', 'fog'),
                        'no_classes': (folder / CLASSES[0], 'fog'),  # images but no class folders
                        'no_images': (empty, 'fog'),
                        'unknown_corruption': (folder, 'frosty')}[case]
    r = build('--data_path', data, '--output_dir', tmp_path / 'out', '--corruptions', 'gaussian_noise', corruption)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    if case == 'unknown_corruption':
        assert 'frosty' in lines[0] and 'jpeg_compression' in lines[0]  # names the choices
    assert not (tmp_path / 'out').exists()


def test_preprocessing_matches_torchvision(tmp_path):
    """The official set was made with torchvision's Resize(256) + CenterCrop(224); ours must equal it."""
    from torchvision import transforms
    spec = importlib.util.spec_from_file_location('make_imagenet_c', SCRIPT)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (500, 375), (333, 333), (256, 301), (120, 100)]:
        path = tmp_path / f'{h}x{w}.png'
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        ours = builder.load_image(str(path), keep_size=False)
        assert ours.shape == (224, 224, 3)
        assert np.array_equal(ours, np.asarray(reference(Image.open(path).convert('RGB'))))
