"""Online TTT-MAE's streams (docs/online.md): the order of the images, each process's share and how far it
got, the stream's state saved beside the results so that a killed run continues exactly where they end,
and the drift a stream's records show. engine_online.py runs the stream."""
import glob
import os
import re

import numpy as np
import torch

from util.checkpoint import load_checkpoint
from util.compat import check_stream_state
from util.errors import UserError
from util.io import atomic_path
from util.natural_sort import natural_key
from util.seed import Stream, derive_seed


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
    return [indices[i] for i in np.random.default_rng(derive_seed(seed, Stream.STREAM_ORDER)).permutation(len(indices))]


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
        return check_stream_state(load_checkpoint(path, 'online stream state'), path)


DRIFT_WINDOW = 50  # stream positions per point of an online run's drift record


def drift(records, window=DRIFT_WINDOW):
    """What shows an online stream drifting, per `window` consecutive stream positions: the accuracy
    after the last step (percent), the share of the most predicted class (percent) and the mean distance
    of the weights from the loaded ones."""
    order = np.argsort(records['position'], kind='stable')
    pred, label, distance = records['pred'][order, -1], records['label'][order], records['weight_distance'][order]
    starts = range(0, len(order), window)
    return {'window': window, 'first_position': [int(records['position'][order][s]) for s in starts],
            'accuracy_last_step': [100 * float(np.mean(pred[s:s + window] == label[s:s + window])) for s in starts],
            'top_class_share': [100 * float(np.bincount(pred[s:s + window]).max() / len(pred[s:s + window]))
                                for s in starts],
            'weight_distance': [float(distance[s:s + window].mean()) for s in starts]}
