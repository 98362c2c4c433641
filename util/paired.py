"""Paired gains of one run over another on the same images: per image, correct in the run minus correct in the
other (in {-1, 0, 1}), averaged, with the standard error over images (scripts/paired_gain.py,
scripts/collect_results.py)."""
import math

import numpy as np

from util.errors import UserError


def mean_se(d):
    """The mean of d (points: x 100) and its standard error, sample std / sqrt(n) (NaN for one value)."""
    d = np.asarray(d, dtype=np.float64)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float('nan')
    return 100 * d.mean(), 100 * se


def paired_differences(run, base, step, folder):
    """Per image, correct after `step` steps of `run` minus correct in `base` (their per_image.npz records,
    paired by index and checked by file name and label), and the images' file names (None if unrecorded)."""
    if not np.array_equal(run['index'], base['index']):
        raise UserError(f"{folder}: the run and the baseline hold different images "
                        f"({len(run['index'])} vs {len(base['index'])})")
    for key in ('label', 'filename'):
        if key in run and key in base and not np.array_equal(run[key], base[key]):
            raise UserError(f"{folder}: {key}s of the run and the baseline differ")
    last = run['pred'].shape[1] - 1
    if not 0 <= step <= last:
        raise UserError(f"{folder}: no step {step} (the run has steps 0..{last})")
    d = (run['pred'][:, step] == run['label']).astype(np.int64) - (base['pred'][:, 0] == base['label']).astype(np.int64)
    return d, (run['filename'].tolist() if 'filename' in run else None)


def mean_over_sets(diffs):
    """The gain over several test sets, [(d, names)] one per set: where every set holds the same images (the
    corruptions of one clean set), each image's differences are averaged over the sets and the standard
    error is over images; otherwise over every (image, set) pair pooled. Returns (gain, se, images, paired)."""
    names = [n for _, n in diffs]
    if len(diffs) > 1 and all(n is not None for n in names) and len({frozenset(n) for n in names}) == 1:
        order = sorted(names[0])
        per_image = np.mean([[dict(zip(n, d))[k] for k in order] for d, n in diffs], axis=0)
        return (*mean_se(per_image), len(order), True)
    pooled = np.concatenate([d for d, _ in diffs])
    return (*mean_se(pooled), len(pooled), len(diffs) == 1)
