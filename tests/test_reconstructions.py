"""util/reconstructions.py: the pictures of the masked input and the reconstruction."""
import numpy as np
import torch

from conftest import tiny_model
from util.reconstructions import compose, save_figure, shown_steps, to_uint8


def test_shown_steps():
    assert shown_steps(20) == [0, 1, 2, 5, 10, 20] and shown_steps(3) == [0, 1, 2, 3] and shown_steps(0) == [0]


def test_kept_patches_come_from_the_input_and_a_perfect_prediction_is_the_image():
    image = torch.randn(3, 16, 16)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for norm_pix in (False, True):
        model = tiny_model(norm_pix_loss=norm_pix)
        target = model.patchify(image[None])[0]
        if norm_pix:  # the decoder predicts each patch standardised by its own mean and variance
            perfect = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
        else:
            perfect = target
        masked, recon = compose(model, image, perfect, order, 0.75)
        assert np.abs(recon.astype(int) - to_uint8(image).astype(int)).max() <= 1
        wrong = compose(model, image, torch.zeros_like(perfect), order, 0.75)[1]
        kept = model.unpatchify(torch.isin(torch.arange(16), order[:4]).float()[None, :, None].expand(1, 16, 48))
        kept = kept[0, 0].bool().numpy()
        assert np.array_equal(wrong[kept], to_uint8(image)[kept])  # kept patches pasted back
        assert np.all(masked[~kept] == 128) and np.array_equal(masked[kept], to_uint8(image)[kept])


def test_figure_is_a_png(tmp_path):
    from PIL import Image
    picture = np.zeros((16, 16, 3), np.uint8)
    save_figure(tmp_path / 'x.png', 'a title', [('a', picture), ('b', picture + 255)])
    with Image.open(tmp_path / 'x.png') as f:
        assert f.format == 'PNG' and f.width > f.height
