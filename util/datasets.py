"""Image folders, transforms and test-time views, with clear errors for bad data and ImageNet's labels."""
import math
import os
from importlib import resources

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from util.cli import TEST_SET_NAMES
from util.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm_info(name):
    return resources.files('timm.data._info').joinpath(name).read_text().split()


def imagenet_wnids():
    """The 1000 ImageNet-1k wnids, sorted: a wnid's position is its standard class index."""
    wnids = sorted(_timm_info('imagenet_synsets.txt'))
    assert len(wnids) == 1000
    return wnids


# --dataset_name of the test-time scripts: how its class folders are named, and which of the ImageNet-1k
# classes it holds (ImageNet-R and -A: 200 each, from the lists timm ships)
TEST_SETS = {
    'imagenet_c': ('wnid', None), 'imagenet': ('wnid', None),
    'imagenet_r': ('wnid', 'imagenet_r_synsets.txt'), 'imagenet_a': ('wnid', 'imagenet_a_synsets.txt'),
    'imagenet_v2': ('index', None),  # folders 0 .. 999: the class index itself
    'imagenet_sketch': ('wnid', None),
    'folder': ('class', None),  # folders named as the head's classes (a dataset of one's own)
}
assert tuple(TEST_SETS) == TEST_SET_NAMES


def imagenet_subset(dataset_name):
    """The sorted ImageNet-1k class indices a test set holds, or None for all (or not an ImageNet set)."""
    synsets = TEST_SETS[dataset_name][1]
    if synsets is None:
        return None
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return sorted(index[w] for w in _timm_info(synsets))


def class_folders(root):
    """The sorted class sub-folder names of an image folder; a missing or empty one is a UserError."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    return classes


def training_classes(root):
    """The class list a head trained on this folder predicts, in label order: the 1000 ImageNet wnids
    when every folder is one (a folder with some ImageNet classes keeps the standard labels), else the
    sorted folder names."""
    folders = class_folders(root)
    wnids = imagenet_wnids()
    return wnids if set(folders) <= set(wnids) else folders


def folder_labels(root, dataset_name, head_classes):
    """{folder: label} of a test folder, the label being the index of the head's output for it.

    A folder may hold only some of the classes; a class folder the set or the head does not have is a
    UserError naming the first offenders."""
    folders = class_folders(root)
    naming = TEST_SETS[dataset_name][0]
    wnids = imagenet_wnids()
    if naming != 'class' and list(head_classes) != wnids:
        raise UserError(f"--dataset_name {dataset_name} needs a head over the 1000 ImageNet classes; this one "
                        f"predicts {len(head_classes)} classes ({', '.join(head_classes[:3])}, ...): "
                        f"use --dataset_name folder")
    if naming == 'index':
        allowed = {str(i): i for i in range(1000)}
        what = 'class indices 0..999 (ImageNet-V2 folders)'
    else:
        index = {c: i for i, c in enumerate(head_classes)}
        subset = imagenet_subset(dataset_name)
        allowed = index if subset is None else {wnids[i]: i for i in subset}
        what = {'class': "the head's classes", 'wnid': 'ImageNet wnids'}[naming] + \
            ('' if subset is None else f' of {dataset_name} (200 classes)')
    unknown = [c for c in folders if c not in allowed]
    if unknown:
        raise UserError(f"{root}: {len(unknown)} class folder(s) not among {what}: {', '.join(unknown[:5])}"
                        + (' ...' if len(unknown) > 5 else ''))
    return {c: allowed[c] for c in folders}


def head_classes(args, probe_classes, num_outputs):
    """The head's class names in label order: --classes, else the probe's record, else (a released probe,
    1000 outputs) the ImageNet-1k wnids."""
    if args.classes:
        try:
            with open(args.classes) as f:
                classes = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --classes {args.classes}: {e.strerror}") from None
        if not classes or len(classes) > num_outputs:
            raise UserError(f"--classes {args.classes} lists {len(classes)} classes; the head has {num_outputs} outputs")
        return classes
    if probe_classes:
        return list(probe_classes)
    if num_outputs == 1000:
        return imagenet_wnids()
    raise UserError(f"{args.resume_finetune} records no class names and its head is not a 1000-class ImageNet head: "
                    f"pass --classes FILE, the head's class names in label order, one per line")


def load_test_set(args, classes):
    """The test folder, each class folder labelled by its index among the head's classes."""
    dataset = ImageFolder(args.data_path, labels=folder_labels(args.data_path, args.dataset_name, classes))
    if len(dataset) == 0:
        raise UserError(f"no images in {args.data_path}")
    return dataset


def load_rgb(path):
    """Open an image as RGB; an unreadable or truncated file is a UserError naming it."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except (OSError, PIL.UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with checks and given labels: `labels` maps each class folder's name
    to its label (default: the positions in training_classes(root))."""

    def __init__(self, root, transform=None, labels=None):
        folders = class_folders(root)
        self._labels = labels or {c: i for i, c in enumerate(training_classes(root)) if c in set(folders)}
        unknown = [c for c in folders if c not in self._labels]
        if unknown:
            raise UserError(f"{root}: class folder(s) not among the classes given: {', '.join(unknown[:5])}")
        try:
            super().__init__(root, transform=transform, loader=load_rgb)
        except FileNotFoundError as e:
            raise UserError(f"{root}: {e}") from None

    def find_classes(self, directory):
        classes = class_folders(directory)
        return classes, {c: self._labels[c] for c in classes}


def eval_transform(input_size):
    """Resize(256/224 * size, bicubic) + CenterCrop(size) + normalise (Resize 256 at 224)."""
    return transforms.Compose([
        transforms.Resize(int(input_size * 256 / 224), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


_TO_NORMALISED = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalize(picture):
    """A PIL image -> a normalised float (3, H, W) tensor, as the transforms above end."""
    return _TO_NORMALISED(picture)


def train_transform(input_size, min_scale=0.2, hflip=True):
    """RandomResizedCrop(bicubic, area min_scale..1) + horizontal flip (unless hflip=False) + normalise."""
    if not 0 < min_scale <= 1:
        raise UserError(f"--min_crop_scale must be in (0, 1], got {min_scale}")
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        *([transforms.RandomHorizontalFlip()] if hflip else []),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TestTimeDataset(torch.utils.data.Dataset):
    """Item k = image indices[k] of `samples`, decoded once: a dict with its 'index', 'label', eval
    crop 'image' (normalised) and, with raw=True, the decoded uint8 (3, H, W) image 'raw' that
    random-crop views are cut from on the device."""
    __test__ = False  # not a pytest test class

    def __init__(self, samples, indices, input_size, raw=False):
        self.samples, self.indices, self.raw = samples, list(indices), raw
        self.transform = eval_transform(input_size)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.samples[index]
        image = load_rgb(path)
        item = {'index': index, 'label': label, 'image': self.transform(image)}
        if self.raw:
            item['raw'] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return item


def crop_box(height, width, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a RandomResizedCrop of a height x width image, drawn as torchvision draws
    it, from `generator` (CPU)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _attempt in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
            return top, left, h, w
    # fall back to a central crop of the nearest allowed aspect ratio, as torchvision does
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image, top, left, h, w, size):
    """A crop of a uint8 (3, H, W) image resized to size x size on its device as PIL's bicubic resize
    (the released host path) does: the width, then the height, each pass rounded to uint8. On the CPU
    this is bitwise torchvision's single resize; on a GPU one resize would keep the intermediate in float
    and differ from PIL by up to 29 levels on noisy images (docs/method.md)."""
    bicubic = TF.InterpolationMode.BICUBIC
    crop = TF.resize(image[:, top:top + h, left:left + w], [h, size], interpolation=bicubic, antialias=True)
    return TF.resize(crop, [size, size], interpolation=bicubic, antialias=True)


def random_resized_crops(image, n, size, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """n views of a uint8 (3, H, W) image on its device, each RandomResizedCrop(size, bicubic) + flip,
    normalised. Crop parameters are drawn as torchvision draws them, from `generator` (CPU)."""
    views = []
    for _ in range(n):
        view = resized_crop(image, *crop_box(*image.shape[1:], generator, scale, ratio), size)
        if torch.rand(1, generator=generator).item() < 0.5:
            view = view.flip(-1)
        views.append(view)
    views = torch.stack(views).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return (views - mean) / std


def training_views(images, raws, crop_gens, args):
    """(A, K, B, 3, H, W): the B = --batch_size views of each image k (images (K, 1, 3, H, W)) for each of
    A = --accum_iter micro-batches. With --single_crop the views are the eval crop itself, else random
    resized crops of the decoded uint8 image raws[k], cut with image k's crop generator."""
    if args.single_crop:
        return images.unsqueeze(0).expand(args.accum_iter, -1, args.batch_size, -1, -1, -1)
    return torch.stack([torch.stack([random_resized_crops(raw, args.batch_size, images.shape[-1], gen)
                                     for _ in range(args.accum_iter)]) for raw, gen in zip(raws, crop_gens)], dim=1)


def make_loader(dataset, args, train=True, shuffle=None):
    """A DataLoader over this process's share of the dataset (DistributedSampler, seeded by args.seed).

    Train loaders shuffle and drop the last incomplete batch; evaluation loaders keep order.
    """
    from util.distributed import get_rank, get_world_size
    shuffle = train if shuffle is None else shuffle
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=args.seed,
        drop_last=False)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith('cuda'), drop_last=train,
        persistent_workers=False)
