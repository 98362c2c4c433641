"""Where a sweep's runs are: the runs under a results root at any depth, gathered into columns (one test set
each), as the collectors read them (scripts/collect_results.py, scripts/paired_gain.py).

A run folder holds results.json (or only the released accuracy.txt). Runs without adaptation sit in a
folder named baseline/, finetuned/ or joint/ inside their test set's folder; any other run folder is an
adapting run. A column is the top-most folder that holds an adapting run, or whose baseline/ (finetuned/,
joint/) holds one, named by its path under the root (fog, fog/5, night, ...); adapting runs further down
(fog/memo/, fog/online/) are other methods on the same test set. So the released layout (ROOT/<corruption>/
and ROOT/<corruption>/baseline/), make_imagenet_c.py's ROOT/<corruption>/<severity>/, and sibling folders
per method all read alike."""
import os
import sys
from dataclasses import dataclass, field

from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from util.errors import UserError
from util.natural_sort import natural_key

FIXED = ('baseline', 'finetuned', 'joint')  # runs without adaptation: the probe's, MAE's fine-tuned ViT, joint training


@dataclass
class Column:
    name: str  # its path under the root ('fog', 'fog/5'), or the root's own name when the root is one
    folder: str
    fixed: dict = field(default_factory=dict)  # {'baseline': folder, ...}
    adapting: dict = field(default_factory=dict)  # {'': the column's own run, 'memo': folder/memo, ...}

    @property
    def corruption(self):
        """The ImageNet-C corruption the column is a set of (its first path part), or None."""
        first = self.name.split('/')[0]
        return first if first in CORRUPTIONS + EXTRA_CORRUPTIONS else None


def holds_run(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in ('results.json', 'accuracy.txt'))


def find_columns(root, only=None):
    """The root's columns: ImageNet-C's corruptions in the standard order, then the others in natural order;
    with `only`, those names in that order."""
    if not os.path.isdir(root):
        raise UserError(f"results folder not found: {root}")
    root = os.path.normpath(root)  # root/ (a shell's completion) names the same folders
    runs = sorted(d for d, _, _ in os.walk(root) if holds_run(d))
    owner = lambda run: os.path.dirname(run) if os.path.basename(run) in FIXED and run != root else run  # noqa: E731
    candidates = {owner(r) for r in runs}
    tops = sorted(c for c in candidates if not any(is_below(c, other) for other in candidates if other != c))
    columns = {}
    for top in tops:
        name = os.path.relpath(top, root).replace(os.sep, '/')
        columns[top] = Column(os.path.basename(os.path.abspath(root)) if name == '.' else name, top)
    for run in runs:
        column = next(c for top, c in columns.items() if top == owner(run) or is_below(owner(run), top))
        if owner(run) != run and os.path.dirname(run) == column.folder:
            column.fixed[os.path.basename(run)] = run
        elif owner(run) == run:
            column.adapting['' if run == column.folder else os.path.relpath(run, column.folder).replace(os.sep, '/')] = run
    if not columns:
        raise UserError(f"{root} holds no run: ROOT/<name>/results.json (a corruption, e.g. {root}/{CORRUPTIONS[0]}/, "
                        f"or a test set of your own) or ROOT/<name>/baseline/results.json, at any depth")
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    order = sorted(columns.values(), key=lambda c: (c.corruption is None, known.index(c.corruption) if c.corruption
                                                     else 0, natural_key(c.name)))
    if only:
        by_name = {c.name: c for c in order}
        missing = [n for n in only if n not in by_name]
        if missing:
            raise UserError(f"{root} holds no run folder {', '.join(missing)} (its columns: "
                            f"{', '.join(by_name)})")
        return [by_name[n] for n in only]
    ignored = [e.name for e in os.scandir(root) if e.is_dir() and not any(is_below(r, e.path) or r == e.path
                                                                        for r in runs)]
    if ignored:
        print(f"note: ignoring folders that hold no run: {', '.join(sorted(ignored))}", file=sys.stderr)
    return order


def is_below(path, folder):
    return os.path.commonpath([path, folder]) == folder and path != folder
