"""Build an ImageNet-C style set from an ImageFolder: OUTPUT_DIR/<corruption>/<severity>/<class>/<stem>.JPEG.

By default each image is prepared as the official set was (Hendrycks' make_imagenet_c.py: torchvision
Resize(256) with its default bilinear filter, CenterCrop(224), corrupt, JPEG quality 85 optimize=True).
Reruns skip finished files and write identical bytes: every output's seed is a stable hash of
(--seed, corruption, severity, input path relative to --data_path).
A killed run leaves no half-written image (outputs are renamed into place); do not run two builders
on the same corruption at once, since each deletes the temporaries it finds.
Exit status: 0 if every output was written or already there, 1 if some failed, 2 on bad arguments.
"""
import argparse
import multiprocessing
import os
import sys
import time
import zlib
from collections import defaultdict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import imagecorruptions  # noqa: E402,F401  (util.corruptions imports it lazily; here, forked workers share it)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, corrupt  # noqa: E402
from util.io import atomic_path  # noqa: E402

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # torchvision's


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data_path', required=True, help='ImageFolder root: <data_path>/<class>/<image>')
    parser.add_argument('--output_dir', required=True, help='root of the corrupted set')
    parser.add_argument('--corruptions', nargs='+', default=list(CORRUPTIONS),
                        help="names, space or comma separated (default: the 15 standard ones); "
                             "'all' = the 15 + " + ', '.join(EXTRA_CORRUPTIONS))
    parser.add_argument('--severities', nargs='+', type=int, default=list(SEVERITIES), choices=SEVERITIES)
    parser.add_argument('--keep_size', action='store_true',
                        help='corrupt images at their own size (small images), instead of Resize(256) + CenterCrop(224)')
    parser.add_argument('--jpeg_quality', default=85, type=int, help='85 as in the official set')
    parser.add_argument('--workers', type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
                        help='parallel processes (default: the CPUs this process may use)')
    parser.add_argument('--max_per_class', default=None, type=int,
                        help='only the first N images (sorted by name) of each class, for quick subsets')
    parser.add_argument('--seed', default=0, type=int, help='base seed')
    return parser


class UserError(Exception):
    """Bad arguments or input folder: one line on stderr, exit code 2."""


def parse_corruptions(items):
    names = [n for item in items for n in item.replace(',', ' ').split()]
    if 'all' in names:
        names = [n for n in names if n != 'all'] + list(CORRUPTIONS + EXTRA_CORRUPTIONS)
    unknown = sorted({n for n in names if n not in CORRUPTIONS + EXTRA_CORRUPTIONS})
    if unknown:
        raise UserError(f"unknown corruption(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)} or 'all'")
    return [n for n in CORRUPTIONS + EXTRA_CORRUPTIONS if n in names]  # standard order, no duplicates


def list_images(data_path, max_per_class):
    """Sorted relative paths ('<class>/<sub>/<file>') of the images under each class folder."""
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path not found: {data_path}")
    classes = sorted(e.name for e in os.scandir(data_path) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f"{data_path} has no class sub-folders (expected {data_path}/<class>/<image>)")
    rel_paths = []
    for cls in classes:
        found = []
        for folder, subdirs, files in os.walk(os.path.join(data_path, cls), followlinks=True):
            subdirs.sort()
            rel = os.path.relpath(folder, data_path).replace(os.sep, '/')
            found += [f'{rel}/{f}' for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        rel_paths += found[:max_per_class]
    if not rel_paths:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {data_path}")
    outputs = {}
    for rel in rel_paths:
        out = output_rel(rel)
        if out in outputs:
            raise UserError(f"{outputs[out]} and {rel} would both be written as {out}")
        outputs[out] = rel
    return rel_paths


def output_rel(rel_path):
    return os.path.splitext(rel_path)[0] + '.JPEG'


def file_seed(seed, name, severity, rel_path):
    # crc32, not hash(): Python salts str hashes per process, which would break reruns
    return zlib.crc32(f'{seed}/{name}/{severity}/{rel_path}'.encode())


def existing_outputs(folder):
    """Names of finished outputs in `folder`; deletes temporaries left by a killed run."""
    if not os.path.isdir(folder):
        return set()
    names = set()
    for entry in os.scandir(folder):
        if entry.name.startswith('.') and entry.name.endswith('.tmp'):  # util.io.atomic_path's temporaries
            os.remove(entry.path)
        else:
            names.add(entry.name)
    return names


def load_image(path, keep_size):
    with Image.open(path) as f:
        img = f.convert('RGB')
    if keep_size:
        return np.asarray(img)
    # torchvision Resize(256) (short side to 256, long side truncated, bilinear) + CenterCrop(224)
    w, h = img.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    return np.asarray(img.crop((left, top, left + 224, top + 224)))


def process_image(task):
    """Write the missing outputs of one input image; returns (rel_path, error or None, [(name, severity, seconds, error)])."""
    rel_path, jobs, args = task
    try:
        image = load_image(os.path.join(args.data_path, rel_path), args.keep_size)
    except Exception as e:  # unreadable or truncated input: reported by the parent, not fatal
        return rel_path, f'{type(e).__name__}: {e}', []
    results = []
    for name, severity in jobs:
        start = time.perf_counter()
        try:
            out = corrupt(image, name, severity, file_seed(args.seed, name, severity, rel_path))
            with atomic_path(os.path.join(args.output_dir, name, str(severity), output_rel(rel_path))) as tmp:
                Image.fromarray(out).save(tmp, format='JPEG', quality=args.jpeg_quality, optimize=True)
            error = None
        except Exception as e:
            error = f'{type(e).__name__}: {e}'
        results.append((name, severity, time.perf_counter() - start, error))
    return rel_path, None, results


def main(args):
    names = parse_corruptions(args.corruptions)
    severities = sorted(set(args.severities))
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise UserError(f"--max_per_class must be at least 1, got {args.max_per_class}")
    rel_paths = list_images(args.data_path, args.max_per_class)

    # Skip what a previous run finished: one scandir per output folder (files of a folder come together).
    jobs = defaultdict(list)
    skipped = defaultdict(int)
    folder_seen, existing = None, set()
    for name in names:
        for severity in severities:
            for rel in rel_paths:
                folder, file = os.path.split(os.path.join(args.output_dir, name, str(severity), output_rel(rel)))
                if folder != folder_seen:
                    folder_seen, existing = folder, existing_outputs(folder)
                if file in existing:
                    skipped[name] += 1
                else:
                    jobs[rel].append((name, severity))

    written, failed, tried, seconds = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(float)
    total = sum(len(j) for j in jobs.values())
    print(f"{len(rel_paths)} images x {len(names)} corruptions x {len(severities)} severities: "
          f"{total} to write, {sum(skipped.values())} already there", flush=True)
    start = time.time()
    tasks = [(rel, jobs[rel], args) for rel in rel_paths if jobs[rel]]
    workers = min(args.workers, max(1, len(tasks)))
    if 'glass_blur' in names and tasks:
        # compile glass blur's numba kernel (~2 s) once here; the forked workers inherit it
        corrupt(np.zeros((32, 32, 3), np.uint8), 'glass_blur', 1, seed=0)
    with multiprocessing.Pool(workers) as pool, \
            tqdm(total=total, unit='img', file=sys.stderr) as bar:
        for rel, load_error, results in pool.imap_unordered(process_image, tasks):
            if load_error:
                tqdm.write(f"unreadable image: {rel} ({load_error})", file=sys.stderr)
                for name, _ in jobs[rel]:
                    failed[name] += 1
            for name, severity, secs, error in results:
                tried[name] += 1
                seconds[name] += secs
                if error:
                    failed[name] += 1
                    tqdm.write(f"failed: {name}/{severity}/{rel} ({error})", file=sys.stderr)
                else:
                    written[name] += 1
            bar.update(len(jobs[rel]))
    elapsed = time.time() - start

    print(f"\n{'corruption':<20}{'written':>9}{'skipped':>9}{'failed':>8}{'ms/img':>9}")
    for name in names:
        ms = f'{1000 * seconds[name] / tried[name]:9.1f}' if tried[name] else f"{'-':>9}"
        print(f"{name:<20}{written[name]:>9}{skipped[name]:>9}{failed[name]:>8}{ms}")
    n_written, n_failed = sum(written.values()), sum(failed.values())
    print(f"total: {n_written} written, {sum(skipped.values())} skipped (already there), {n_failed} failed "
          f"in {elapsed:.1f} s ({n_written / max(elapsed, 1e-9):.1f} images/s with {workers} workers)")
    print("ms/img: time per image in one worker, corruption + JPEG write (input decode not included)")
    return 1 if n_failed else 0


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args))
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
