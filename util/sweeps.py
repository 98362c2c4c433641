"""Where a sweep's runs are: the result folders of a results root, as the collectors read them."""
import os
import sys

from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from util.errors import UserError
from util.natural_sort import natural_key


def sweep_corruptions(root):
    """The run folders of a sweep's results root (ROOT/<name>/), as columns: ImageNet-C's corruptions in the
    standard order, then any other folder holding a run (results.json, a released accuracy.txt, or a
    baseline/ with one: a test set of one's own, e.g. night/ or siteB/), in natural order."""
    if not os.path.isdir(root):
        raise UserError(f"results folder not found: {root}")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    standard = [c for c in CORRUPTIONS + EXTRA_CORRUPTIONS if c in folders]
    holds_run = lambda *parts: any(os.path.exists(os.path.join(root, *parts, f)) for f in ('results.json', 'accuracy.txt'))
    others = [f for f in folders if f not in standard and (holds_run(f) or holds_run(f, 'baseline'))]
    columns = standard + sorted(others, key=natural_key)
    if not columns:
        raise UserError(f"{root} has no result folders: ROOT/<name>/results.json (a corruption, e.g. "
                        f"{root}/{CORRUPTIONS[0]}/, or a test set of your own) or ROOT/<name>/baseline/results.json")
    ignored = [f for f in folders if f not in columns]
    if ignored:
        print(f"note: ignoring folders that hold no run: {', '.join(ignored)}", file=sys.stderr)
    return columns
