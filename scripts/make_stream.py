"""A stream of several test sets one after another, for online TTT-MAE (docs/online.md): neighbours share
their shift, as frames of a video share theirs, and the stream moves from one shift to the next (the
continual test-time adaptation benchmarks' ImageNet-C: corruption after corruption).

  python scripts/make_stream.py --sets imagenet-c/fog/5 imagenet-c/snow/5 imagenet-c/frost/5 --output_dir streams/weather
  python main_online_ttt.py --data_path streams/weather --subset_file streams/weather/stream.txt --stream_order listed ...

OUTPUT_DIR/<class>/<set>__<image> links to each image (no copies), and OUTPUT_DIR/stream.txt lists them
set by set, each set's images shuffled with --seed (or in time order, --within_set natural): the order an
online run follows with --subset_file --stream_order listed. The same folder with --stream_order shuffled
is the control without locality. <set> is the set's last two path parts (fog-5), or --names. A rerun with the same arguments
changes nothing; outputs other arguments made are refused.
"""
import os
import pathlib
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from util.cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser, UserError, run_main  # noqa: E402
from util.datasets import ImageFolder  # noqa: E402
from util.io import write_text  # noqa: E402
from util.natural_sort import natural_key  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(__doc__, prog='scripts/make_stream.py')
    parser.add_argument('--sets', nargs='+', required=True,
                        help='image folders <set>/<class>/<image>, in stream order')
    parser.add_argument('--names', nargs='+', default=None, help="the sets' names in the links (default: fog-5)")
    parser.add_argument('--output_dir', required=True, help='the stream folder')
    parser.add_argument('--max_per_set', default=None, type=POSITIVE_INT,
                        help='the first N images of each set in its order (None: all)')
    parser.add_argument('--seed', default=0, type=NON_NEGATIVE_INT, help='seed of the shuffle within each set')
    parser.add_argument('--within_set', default='shuffled', choices=['shuffled', 'natural'],
                        help="each set's images shuffled with --seed, or in time order: by file name with numbers "
                             "as numbers (video frames: frame_2 before frame_10)")
    return parser


def set_name(path):
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return '-'.join(parts[-2:])


def main(args):
    names = args.names or [set_name(s) for s in args.sets]
    if len(names) != len(args.sets):
        raise UserError(f"--names gives {len(names)} names for {len(args.sets)} --sets")
    if len(set(names)) != len(names):
        raise UserError(f"two sets have the same name ({', '.join(names)}): pass --names")
    if any('__' in n or os.sep in n for n in names):
        raise UserError(f"a set's name may not hold '__' or '{os.sep}': {', '.join(names)}")
    for path in args.sets:
        if not os.path.isdir(path):
            raise UserError(f"--sets: {path} is not a folder")
    links, listed = {}, []
    for number, (path, name) in enumerate(zip(args.sets, names)):
        dataset = ImageFolder(path)
        if args.within_set == 'natural':
            order = sorted(range(len(dataset)), key=lambda i: (natural_key(os.path.basename(dataset.samples[i][0])),
                                                               natural_key(dataset.samples[i][0])))
        else:
            order = np.random.default_rng([args.seed, number]).permutation(len(dataset))
        order = order[:args.max_per_set]
        for i in order:
            source, label = dataset.samples[i]
            # the class, then the file's path inside it (a class folder may hold sub-folders)
            inside = os.path.relpath(source, os.path.join(path, dataset.classes[label])).replace(os.sep, '__')
            relative = f"{dataset.classes[label]}/{name}__{inside}"
            links[relative] = os.path.abspath(source)
            listed.append(relative)
    stream_file = os.path.join(args.output_dir, 'stream.txt')
    text = ''.join(f'{r}\n' for r in listed)
    if os.path.exists(stream_file) and pathlib.Path(stream_file).read_text() != text:
        raise UserError(f"{args.output_dir} holds a stream other arguments made; use another --output_dir")
    for relative, source in links.items():
        link = os.path.join(args.output_dir, relative)
        if os.path.lexists(link):
            if os.path.realpath(link) != os.path.realpath(source):
                raise UserError(f"{link} exists and is not a link to {source}; use another --output_dir")
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(source, link)
    write_text(stream_file, text)  # last: a stream.txt means every link it lists is there
    print(f"{len(listed)} images of {len(names)} sets ({', '.join(names)}) in {args.output_dir}; "
          f"stream order in {stream_file}")


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
