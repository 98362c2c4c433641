"""util/datasets.py: labels of image folders, the training augmentation (the released recipe by default,
and what --min_crop_scale / --no_hflip change), the test-time dataset and its on-device views."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

import main_pretrain
import main_prob
from conftest import make_image_folder
from util.errors import UserError
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, ImageFolder, TestTimeDataset, crop_box, eval_transform,
                           imagenet_subset, imagenet_wnids, load_rgb, random_resized_crops, folder_labels,
                           resized_crop, train_transform, training_classes)


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



def test_imagenet_wnid_subset_keeps_standard_labels(tmp_path):
    wnids = imagenet_wnids()
    chosen = [wnids[0], wnids[417], wnids[999]]
    root = make_image_folder(tmp_path / 'c', chosen, 1)
    assert [label for _, label in ImageFolder(root).samples] == [0, 417, 999]
    assert [label for _, label in ImageFolder(make_image_folder(tmp_path / 'd', ['cat', 'dog'], 1)).samples] == [0, 1]
    with pytest.raises(UserError, match='not among the classes given: dog'):
        ImageFolder(str(tmp_path / 'd'), labels={'cat': 0})


def test_bad_folders_and_images_are_user_errors(tmp_path):
    with pytest.raises(UserError, match='not found'):
        ImageFolder(str(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no class sub-folders'):
        ImageFolder(str(tmp_path / 'empty'))
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
    with pytest.raises(UserError, match='cannot read image .*bad.png'):
        load_rgb(str(tmp_path / 'bad.png'))


def test_test_time_items_hold_the_raw_image_only_for_random_crops(tmp_path):
    samples = ImageFolder(make_image_folder(tmp_path / 'd', ['a', 'b'], 3)).samples
    single = TestTimeDataset(samples, [4, 1], 16)
    item = single[0]
    assert set(item) == {'index', 'label', 'image'} and (item['index'], item['label']) == (4, 1)
    assert torch.equal(item['image'], eval_transform(16)(load_rgb(samples[4][0])))
    raw = TestTimeDataset(samples, [4, 1], 16, raw=True)[1]
    assert raw['raw'].dtype == torch.uint8 and raw['raw'].shape == (3, 16, 16)
    assert torch.equal(raw['raw'].permute(1, 2, 0), torch.from_numpy(np.array(load_rgb(samples[1][0]))))
    batch = next(iter(torch.utils.data.DataLoader(single, batch_size=2)))  # the baseline's batches
    assert batch['index'].tolist() == [4, 1] and batch['image'].shape == (2, 3, 16, 16)


def test_random_resized_crops_full_crop_is_the_image_and_seeded():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    views = random_resized_crops(image, 6, 16, gen, scale=(1, 1), ratio=(1, 1))
    normalised = eval_transform(16).transforms[-1](image.float() / 255)
    for view in views:  # the whole image, maybe flipped
        assert torch.allclose(view, normalised, atol=1e-5) or torch.allclose(view, normalised.flip(-1), atol=1e-5)
    a = random_resized_crops(image, 4, 8, torch.Generator().manual_seed(1))
    b = random_resized_crops(image, 4, 8, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, b)


def noisy_photo_like(size, seed):
    """A smooth gradient with edges and strong pixel noise (as gaussian_noise at severity 5): the
    images where resize implementations part most, by bicubic's overshoot next to the clipping range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    base = np.stack([200 * x, 200 * y, 120 + 100 * ((x > 0.4) & (y < 0.7))], axis=-1)
    return np.clip(base + rng.normal(0, 60, base.shape), 0, 255).astype(np.uint8)


def view_errors(device, size=48, boxes=64):
    """|views - PIL's bicubic resize of crop(box)| in 0-255 levels, for RandomResizedCrop boxes (both up-
    and downsampling: the images are 64x64) of noisy images. PIL in two explicit passes, the width
    first, as the released Pillow 9.2 ran them (Pillow 13 does the height first when it shrinks more)."""
    errors = []
    for seed in range(3):
        array = noisy_photo_like(64, seed)
        image, tensor = Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1).to(device)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(boxes):
            top, left, h, w = crop_box(64, 64, gen)
            ours = resized_crop(tensor, top, left, h, w, size).permute(1, 2, 0).cpu().numpy().astype(np.int16)
            crop = image.crop((left, top, left + w, top + h))
            pil = np.asarray(crop.resize((size, h), Image.BICUBIC).resize((size, size), Image.BICUBIC))
            errors.append(np.abs(ours - pil))
    return np.stack(errors)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)])
def test_random_crop_views_are_pils_bicubic_resize(device):
    """The released views were resized by PIL on the host; here on the device, within rounding of it.
    (A single float resize on a GPU was off by up to 29 levels and by 0.56 on average: docs/method.md.)"""
    errors = view_errors(device)
    assert errors.max() <= 2 and errors.mean() < 0.02, (errors.mean(), errors.max())


def test_on_the_cpu_the_two_passes_are_torchvisions_single_resize():
    """So random-crop views on the CPU (and results recorded with them) are those of the single
    torchvision (v2) resize they were cut with before."""
    array = noisy_photo_like(64, 0)
    tensor, gen = torch.from_numpy(array).permute(2, 0, 1), torch.Generator().manual_seed(0)
    for _ in range(64):
        box = crop_box(64, 64, gen)
        single = TF2.resized_crop(tensor, *box, [48, 48], interpolation=TF2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(resized_crop(tensor, *box, 48), single), box


def test_imagenet_r_a_v2_sketch_folders(tmp_path):
    wnids = imagenet_wnids()
    r = imagenet_subset('imagenet_r')
    assert len(r) == 200 and r == sorted(r) and len(imagenet_subset('imagenet_a')) == 200
    assert imagenet_subset('imagenet_sketch') is None
    inside, outside = wnids[r[0]], wnids[next(i for i in range(1000) if i not in r)]
    folder = make_image_folder(tmp_path / 'r', [inside], 1)
    assert folder_labels(folder, 'imagenet_r', wnids) == {inside: r[0]}
    make_image_folder(tmp_path / 'r', [outside], 1)
    with pytest.raises(UserError, match=f'not among ImageNet wnids of imagenet_r .200 classes.: {outside}'):
        folder_labels(folder, 'imagenet_r', wnids)
    assert folder_labels(folder, 'imagenet_sketch', wnids) == {inside: r[0], outside: wnids.index(outside)}
    v2 = make_image_folder(tmp_path / 'v2', ['0', '17', '999'], 1)
    assert folder_labels(v2, 'imagenet_v2', wnids) == {'0': 0, '17': 17, '999': 999}  # not '17' < '999' < '0'
    make_image_folder(tmp_path / 'v2', ['1000', 'cat'], 1)
    with pytest.raises(UserError, match=r'2 class folder\(s\) not among class indices 0..999 .*: 1000, cat'):
        folder_labels(v2, 'imagenet_v2', wnids)
    with pytest.raises(UserError, match='needs a head over the 1000 ImageNet classes'):
        folder_labels(folder, 'imagenet_r', ['a', 'b'])


def test_training_folders_keep_imagenet_labels_and_val_follows_train(tmp_path):
    wnids = imagenet_wnids()
    train = make_image_folder(tmp_path / 'train', [wnids[5], wnids[9]], 1)
    assert training_classes(train) == wnids  # a 1000-way head whose labels are the standard ones
    own = make_image_folder(tmp_path / 'own', ['cat', 'dog', 'emu'], 1)
    assert training_classes(own) == ['cat', 'dog', 'emu']
    labels = {c: i for i, c in enumerate(training_classes(own))}
    val = make_image_folder(tmp_path / 'val', ['dog', 'emu'], 1)  # lacks a class: the others keep theirs
    assert sorted({label for _, label in ImageFolder(val, labels=labels).samples}) == [1, 2]
