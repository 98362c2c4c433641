"""Per-image records of a test-time run on disk: kept safe against kills, shared by processes, and read back.

Every process appends its records to small chunk files in OUT/partial/ (each written atomically);
the set of finished images is the union of all chunks and of OUT/per_image.npz, so a rerun with
any number of processes skips them. The merge sorts records by image index. per_image.npz is
rewritten with the images done so far while a run is unfinished (util/outputs.py), marked by PARTIAL_KEY,
and is final once every image is done: is_finished and load_per_image are how scripts read it.
"""
import glob
import os
import time

import numpy as np

from util.errors import UserError
from util.io import atomic_open

# only in the per_image.npz of an unfinished run: how many images the run will hold when it is finished
PARTIAL_KEY = 'num_images_expected'


class ResultStore:
    def __init__(self, output_dir, rank=0):
        self.output_dir = output_dir
        self.partial_dir = os.path.join(output_dir, 'partial')
        self.final_path = os.path.join(output_dir, 'per_image.npz')
        self.prefix = f"rank{rank}-{os.getpid()}-{time.time_ns()}"
        self.pending, self.chunks_written, self.records_written = [], 0, 0
        self._chunks = {}  # chunk files read so far: each is written once, so it is read once

    def _files(self):
        files = sorted(glob.glob(os.path.join(self.partial_dir, '*.npz')))
        return ([self.final_path] if os.path.exists(self.final_path) else []) + files

    def load(self):
        """All records on disk as a dict of arrays sorted by index (first record of an index wins)."""
        parts = []
        for path in self._files():
            if path in self._chunks:
                parts.append(self._chunks[path])
                continue
            try:
                with np.load(path, allow_pickle=False) as f:
                    parts.append({k: f[k] for k in f.files if k != PARTIAL_KEY})
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read result file {path}: {e}") from None
            if path != self.final_path:
                self._chunks[path] = parts[-1]
        if not parts:
            return None
        # per_image.npz also holds file names: merge the fields every part has (a kill may fall
        # between writing per_image.npz and removing the chunks it came from)
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        _, first = np.unique(merged['index'], return_index=True)
        return {k: v[first] for k, v in merged.items()}

    def has_results(self):
        return bool(self._files())

    def done_indices(self):
        records = self.load()
        return set() if records is None else set(records['index'].tolist())

    def add(self, **record):
        self.pending.append(record)

    def flush(self):
        if not self.pending:
            return
        arrays = {k: np.stack([np.asarray(r[k]) for r in self.pending]) for k in self.pending[0]}
        path = os.path.join(self.partial_dir, f"{self.prefix}-{self.chunks_written:06d}.npz")
        with atomic_open(path, 'wb') as f:
            np.savez(f, **arrays)
        self.records_written += len(self.pending)
        self.pending, self.chunks_written = [], self.chunks_written + 1

    def finalize(self, records):
        """Write the merged records to per_image.npz, then drop the chunks they came from."""
        with atomic_open(self.final_path, 'wb') as f:
            np.savez(f, **records)
        for path in glob.glob(os.path.join(self.partial_dir, '*.npz')):
            os.remove(path)
        self._chunks = {}
        if os.path.isdir(self.partial_dir) and not os.listdir(self.partial_dir):
            os.rmdir(self.partial_dir)


def is_finished(folder):
    """Whether FOLDER/per_image.npz exists and is a finished run's."""
    path = os.path.join(folder, 'per_image.npz')
    if not os.path.exists(path):
        return False
    with np.load(path, allow_pickle=False) as f:
        return PARTIAL_KEY not in f.files


def load_per_image(folder):
    """A finished run's per-image records (FOLDER/per_image.npz) as {field: array}."""
    path = os.path.join(folder, 'per_image.npz')
    if not os.path.exists(path):
        raise UserError(f"{path} not found (is the run complete?)")
    with np.load(path, allow_pickle=False) as f:
        if PARTIAL_KEY in f.files:
            raise UserError(f"{path} is an unfinished run's ({len(f['index'])} of {int(f[PARTIAL_KEY])} images): "
                            f"rerun its command to finish it")
        return {k: f[k] for k in f.files}
