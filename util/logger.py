"""Metric logging: running averages and progress lines printed to the console, TensorBoard, JSON lines."""
import datetime
import json
import os
import time
from collections import defaultdict

from util.distributed import all_reduce_mean, is_main_process
from util.io import write_text


class MetricLogger:
    """Averages of named scalars over an epoch, printed every print_freq iterations."""

    def __init__(self, header='', print_freq=20):
        self.header, self.print_freq = header, print_freq
        self.totals, self.counts, self.last = defaultdict(float), defaultdict(int), {}

    def update(self, n=1, **values):
        for k, v in values.items():
            v = float(v)
            self.totals[k] += v * n
            self.counts[k] += n
            self.last[k] = v

    def averages(self, synchronize=True):
        """Epoch averages; with several processes, averaged over them too."""
        avg = {k: self.totals[k] / self.counts[k] for k in self.totals}
        return {k: all_reduce_mean(v) for k, v in avg.items()} if synchronize else avg

    def log_every(self, iterable, total=None):
        total = len(iterable) if total is None else total
        start = time.time()
        for i, item in enumerate(iterable):
            yield item
            if i % self.print_freq == 0 or i == total - 1:
                elapsed = time.time() - start
                eta = datetime.timedelta(seconds=int(elapsed / (i + 1) * (total - i - 1)))
                values = '  '.join(f"{k}: {v:.4g} ({self.totals[k] / self.counts[k]:.4g})"
                                   for k, v in self.last.items())
                print(f"{self.header} [{i}/{total}] eta {eta}  {values}", flush=True)


class ProgressLine:
    """Prints '[done/total] note  R images/s, H:MM:SS left' every `every` images and at the end."""

    def __init__(self, total, every):
        self.total, self.every, self.next, self.start = total, every, every, time.time()

    def update(self, done, note=''):
        """Print if a line is due; returns whether one was printed."""
        if done < self.next and done != self.total:
            return False
        self.next = (done // self.every + 1) * self.every
        rate = done / max(time.time() - self.start, 1e-9)
        left = datetime.timedelta(seconds=round((self.total - done) / rate))
        print(f"[{done}/{self.total}] {note + '  ' if note else ''}{rate:.2f} images/s, {left} left", flush=True)
        return True


def tensorboard_writer(log_dir):
    """A SummaryWriter on the main process, None elsewhere or when there is no log_dir."""
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_json_line(path, record):
    """Append one JSON record (a line of log.txt); flushed so a kill loses at most this line."""
    if is_main_process() and path:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())


def keep_log_before(path, epoch):
    """On resume: keep only the log.txt lines of epochs < epoch. Later lines were written by a killed
    run after the checkpoint now resumed from, and their epochs are redone; unreadable lines (a line
    torn by the kill) go too. A fresh start (epoch 0) empties the file."""
    if not is_main_process() or not path or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)['epoch'] < epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        write_text(path, ''.join(line + '\n' for line in kept))
