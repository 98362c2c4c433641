"""Streams of online TTT-MAE (docs/online.md): the order of the images, each process's share, the
window of recent images, and the stream's state (carried weights and optimiser state) saved beside the
results, so that a killed run continues exactly where its results end."""
import glob
import os
import re
from collections import deque

import numpy as np
import torch

from util.checkpoint import load_checkpoint
from util.errors import UserError
from util.io import atomic_path
from util.results import natural_key
from util.seed import STREAM_ORDER, derive_seed


def stream_order(indices, order, seed, paths):
    """The images in stream order: 'listed' keeps the given order (a --subset_file's, or the folder's),
    'natural' sorts them by file name with numbers compared as numbers (video frames: frame_2 before
    frame_10, whatever their class folder), 'shuffled' is a permutation fixed by the seed (a class-sorted
    folder is a label-correlated stream). paths: every image's path, by index."""
    indices = [int(i) for i in indices]
    if order == 'listed':
        return indices
    if order == 'natural':
        return sorted(indices, key=lambda i: (natural_key(os.path.basename(paths[i])), natural_key(paths[i])))
    return [indices[i] for i in np.random.default_rng(derive_seed(seed, STREAM_ORDER)).permutation(len(indices))]


def process_share(stream, rank, world_size):
    """Process rank's own stream: a contiguous piece of the whole."""
    return [int(i) for i in np.array_split(np.asarray(stream, dtype=np.int64), world_size)[rank]]


def stream_position(share, done):
    """How many images of this process's stream are done; they must be its first ones."""
    position = 0
    while position < len(share) and share[position] in done:
        position += 1
    if any(i in done for i in share[position:]):
        raise UserError("the results on disk are not a prefix of this process's stream (were they made with other "
                        "settings?); use another --output_dir")
    return position


class StreamState:
    """OUT/online/rank{r}-{position}.pt: the trainer's state after `position` images of process r's stream.

    save() writes the new file before the results it goes with are flushed, and prune() removes the older
    files after, so a kill at any moment leaves the state at which the results end."""

    def __init__(self, output_dir, rank):
        self.folder = os.path.join(output_dir, 'online')
        self.prefix = f'rank{rank}-'

    def _files(self):
        found = {}
        for path in glob.glob(os.path.join(self.folder, self.prefix + '*.pt')):
            m = re.fullmatch(re.escape(self.prefix) + r'(\d+)\.pt', os.path.basename(path))
            if m:
                found[int(m.group(1))] = path
        return found

    def save(self, position, state):
        """state: the trainer's state by name (engine_online.OnlineTrainer.state)."""
        os.makedirs(self.folder, exist_ok=True)
        with atomic_path(os.path.join(self.folder, f'{self.prefix}{position:08d}.pt')) as tmp:
            torch.save({'position': position, 'state': state}, tmp)

    def prune(self, position):
        for p, path in self._files().items():
            if p < position:
                os.remove(path)

    def load(self, position):
        """The state saved at this position (None at position 0: the stream starts fresh)."""
        if position == 0:
            return None
        path = self._files().get(position)
        if path is None:
            raise UserError(f"{position} images of this process's stream are done but {self.folder} holds no state "
                            f"for that position: the stream cannot continue exactly; use another --output_dir")
        saved = load_checkpoint(path, 'online stream state')
        if 'state' not in saved:  # before the state was saved by name: a list whose order was the engine's
            raise UserError(f"{path} is an online stream state of an older version of this code, which this one "
                            f"cannot continue exactly; rerun into another --output_dir")
        return saved['state']


class OnlineStream:
    """One process's stream, as engine_test_time.run_test_time_training sees it (its Episodic has the same
    methods): the images in order (share), how many of them earlier runs did (position), the window of the
    last `window` images whose views train each step, what each image records of the drift, and the
    trainer's state saved with the results. What the trainer does differently (the carried weights, the
    remedies against drift) is engine_online.OnlineTrainer's."""

    def __init__(self, share, position, state, window):
        self.share, self.position, self.state, self.window = share, position, state, deque(maxlen=window)

    @classmethod
    def of_run(cls, args, indices, store, paths):
        stream = stream_order(indices, args.stream_order, args.seed, paths)
        share = process_share(stream, args.rank, args.world_size)
        return cls(share, stream_position(share, store.done_indices()), StreamState(args.output_dir, args.rank),
                   args.online_window)

    def todo(self):
        return self.share[self.position:]

    def resume(self, trainer, load_items):
        """Put the saved state into the trainer and refill the window with the images before the
        position; load_items(indices) gives their {'image', 'raw'} items (TestTimeDataset)."""
        saved = self.state.load(self.position)
        if saved is not None:
            trainer.load_state(saved)
        for item in load_items(self.share[max(0, self.position - self.window.maxlen + 1):self.position]):
            self.window.append((item['image'].unsqueeze(0).to(trainer.device),
                                item['raw'].to(trainer.device) if 'raw' in item else None))

    def sources(self, image, raw):
        """The window after `image` (1, 3, H, W) and its decoded `raw` joined it: its (eval crop, raw) pairs."""
        self.window.append((image, raw))
        return list(self.window)

    def records(self, trainer, done):
        """The image's place in the stream and how far the adapted weights are from the loaded ones."""
        return {'position': self.position + done, 'weight_distance': trainer.distance_from_start()}

    def save(self, done, trainer):
        """The trainer's state after `done` more images, written before the results it goes with."""
        self.state.save(self.position + done, trainer.state())

    def prune(self, done):
        self.state.prune(self.position + done)
