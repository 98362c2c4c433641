"""The ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019), deterministic for a given seed.

A thin wrapper over the `imagecorruptions` package (pip `imagecorruptions-imaug`), which holds the
reference implementations of the 19 corruptions.
"""
import numpy as np

CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression')
# Held-out "validation" corruptions, one per family; the paper's mean is over the 15 above only.
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
FAMILIES = {
    'noise': CORRUPTIONS[0:3],
    'blur': CORRUPTIONS[3:7],
    'weather': CORRUPTIONS[7:11],
    'digital': CORRUPTIONS[11:15],
}
SEVERITIES = (1, 2, 3, 4, 5)

_MIN_SIDE = 32  # imagecorruptions rejects images with a side under 32 pixels
# These two draw from a fresh, unseeded generator unless given a seed of their own.
_TAKE_SEED = ('glass_blur', 'impulse_noise')


def corrupt(image, name, severity, seed):
    """Corrupt an HxWx3 uint8 image; returns a new HxWx3 uint8 array, the same for the same seed.

    Reseeds numpy's global generator, which the package draws from.
    """
    if name not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 array, got {getattr(image, 'dtype', type(image))} "
                         f"of shape {getattr(image, 'shape', None)}")
    h, w = image.shape[:2]
    # Reflect-pad small images (e.g. 28x28 digits) rather than resize them, so noise levels and blur
    # radii keep their meaning in pixels; the padding is cropped off again below.
    pad_h, pad_w = max(0, _MIN_SIDE - h), max(0, _MIN_SIDE - w)
    if pad_h or pad_w:
        mode = 'reflect' if min(h, w) > 1 else 'edge'  # numpy cannot reflect a 1-pixel side
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode)

    from imagecorruptions import corrupt as _corrupt  # here: it pulls in scipy, skimage, cv2 and numba (~1 s)

    seed = seed % 2**32  # numpy's and numba's seeding accept 32-bit seeds only
    np.random.seed(seed)  # the other corruptions draw from numpy's global generator (none uses `random`)
    kwargs = {'seed': seed} if name in _TAKE_SEED else {}
    out = _corrupt(image, severity=severity, corruption_name=name, **kwargs)
    return np.ascontiguousarray(out[pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w])
