"""Which images of a test folder a run evaluates, in which order, and how results say so: all of them,
--max_examples spread over the folder, or the list of a --subset_file (a benchmark's fixed subset)."""
import os

import numpy as np

from util.errors import UserError


def select_indices(num_images, max_examples=None, subset='stride', subset_seed=0):
    """Indices of the images to evaluate: all, or max_examples of them spread over the folder."""
    if not max_examples or max_examples >= num_images:
        return np.arange(num_images)
    if subset == 'first':
        return np.arange(max_examples)
    if subset == 'stride':  # evenly spaced, so every class of a class-sorted folder is represented
        return np.floor(np.arange(max_examples) * (num_images / max_examples)).astype(np.int64)
    rng = np.random.default_rng(subset_seed)
    return np.sort(rng.choice(num_images, size=max_examples, replace=False))


def check_selection_flags(args):
    """The flags that choose images, before any work."""
    if args.subset_file and args.max_examples:
        raise UserError("--subset_file and --max_examples both choose the images: pass one")
    if args.max_examples is None and (args.subset != 'stride' or args.subset_seed != 0):
        raise UserError("--subset and --subset_seed choose which --max_examples images: pass --max_examples too")


def select_images(args, dataset):
    """Indices of the images to evaluate: those --subset_file lists (paths relative to --data_path), in
    its order; else all of them, or --max_examples spread over the folder."""
    if not args.subset_file:
        return select_indices(len(dataset), args.max_examples, args.subset, args.subset_seed)
    try:
        with open(args.subset_file) as f:
            listed = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    except OSError as e:
        raise UserError(f"cannot read --subset_file {args.subset_file}: {e.strerror}") from None
    where = {os.path.relpath(path, args.data_path).replace(os.sep, '/'): i for i, (path, _) in enumerate(dataset.samples)}
    missing = [p for p in listed if p not in where]
    if missing or not listed:
        raise UserError(f"{len(missing)} of the {len(listed)} images --subset_file {args.subset_file} lists are not in "
                        f"{args.data_path}" + (f": {', '.join(missing[:3])}" + (' ...' if len(missing) > 3 else '')
                                               if missing else ''))
    if len(set(listed)) != len(listed):
        raise UserError(f"--subset_file {args.subset_file} lists {len(listed) - len(set(listed))} images twice")
    return np.array([where[p] for p in listed], dtype=np.int64)


def describe_selection(args, indices, num_images_in_folder, subset_file_sha256=None):
    """What results.json and the collector say about which images a number comes from."""
    if args.subset_file:
        return {'images': len(indices), 'subset_file': os.path.abspath(args.subset_file),
                'subset_file_sha256': subset_file_sha256}
    if args.max_examples and args.max_examples < num_images_in_folder:
        return {'images': len(indices), 'max_examples': args.max_examples, 'subset': args.subset,
                'subset_seed': args.subset_seed}
    return {'images': len(indices), 'all': True}
