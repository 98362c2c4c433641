"""The training augmentation: the released recipe by default, and what --min_crop_scale / --no_hflip change."""
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import main_pretrain
import main_prob
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, train_transform


def parse(script, *extra):
    return script.get_args_parser().parse_args(['--data_path', 'x', *extra])


def test_defaults_are_the_released_recipe():
    for script, scale in ((main_pretrain, 0.2), (main_prob, 0.08)):
        args = parse(script)
        assert (args.min_crop_scale, args.hflip) == (scale, True)
        args = parse(script, '--min_crop_scale', '0.5', '--no_hflip')
        assert (args.min_crop_scale, args.hflip) == (0.5, False)
    crop, flip = train_transform(32).transforms[:2]
    assert crop.scale == (0.2, 1.0) and flip.p == 0.5
    crop, after = train_transform(32, min_scale=0.5, hflip=False).transforms[:2]
    assert crop.scale == (0.5, 1.0) and type(after).__name__ == 'ToTensor'


def test_flips_only_with_hflip():
    # scale 1 of a square image is the whole image (RandomResizedCrop's fallback), so the only
    # randomness left is the flip
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    plain = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    flipped = plain.flip(-1)
    torch.manual_seed(0)
    with_flips = [train_transform(16, min_scale=1.0)(image) for _ in range(20)]
    n_flipped = sum(torch.equal(x, flipped) for x in with_flips)
    assert 0 < n_flipped < 20 and n_flipped + sum(torch.equal(x, plain) for x in with_flips) == 20
    assert all(torch.equal(train_transform(16, min_scale=1.0, hflip=False)(image), plain) for _ in range(20))

