import numpy as np
import pytest

from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, FAMILIES, corrupt

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS


def digit_like(h, w):
    """A smooth image with edges (blurs, pixelation and JPEG all visibly change it)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, ((x // 4 + y // 4) % 2) * 200 + 20], axis=-1)
    return img.astype(np.uint8)


def test_names_and_families():
    assert CORRUPTIONS == (
        'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
        'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate',
        'jpeg_compression')
    assert EXTRA_CORRUPTIONS == ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
    assert sum(FAMILIES.values(), ()) == CORRUPTIONS
    assert list(FAMILIES) == ['noise', 'blur', 'weather', 'digital']


@pytest.mark.parametrize('shape', [(28, 28), (32, 45)])  # under the package's 32-pixel minimum, and not square
@pytest.mark.parametrize('name', ALL)
def test_keeps_size_and_dtype_and_changes_image(name, shape):
    img = digit_like(*shape)
    original = img.copy()
    out = corrupt(img, name, 5, seed=3)
    assert out.shape == shape + (3,) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 1, f'{name} barely changed the image'
    assert np.array_equal(img, original), 'the input was modified in place'


@pytest.mark.parametrize('name', ALL)
def test_same_seed_same_bytes(name):
    img = digit_like(32, 32)
    a = corrupt(img, name, 3, seed=12345)
    np.random.seed(999)  # the global state in between must not matter
    b = corrupt(img, name, 3, seed=12345)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize('name', ['gaussian_noise', 'impulse_noise', 'glass_blur', 'frost'])
def test_different_seed_differs(name):
    img = digit_like(32, 32)
    assert not np.array_equal(corrupt(img, name, 5, seed=1), corrupt(img, name, 5, seed=2))


def test_severity_orders_noise():
    img = np.full((32, 32, 3), 128, np.uint8)
    spread = [corrupt(img, 'gaussian_noise', s, seed=0).std() for s in (1, 3, 5)]
    assert spread[0] < spread[1] < spread[2]


@pytest.mark.parametrize('bad', [
    dict(name='gaussian_nois'), dict(severity=0), dict(severity=6),
    dict(image=np.zeros((32, 32, 3), np.float32)), dict(image=np.zeros((32, 32), np.uint8))])
def test_bad_input_raises(bad):
    kwargs = dict(image=digit_like(32, 32), name='fog', severity=1, seed=0) | bad
    with pytest.raises(ValueError):
        corrupt(**kwargs)
