"""Results of a test-time run: per-image records kept safe against kills and shared by processes,
their summary, and the output files (the released accuracy.txt / accuracy.npy, results.json).

Every process appends its records to small chunk files in OUT/partial/ (each written atomically);
the set of finished images is the union of all chunks and of OUT/per_image.npz, so a rerun with
any number of processes skips them. The merge sorts records by image index. While a run is
unfinished, the main process rewrites the readable outputs after its flushes, marked partial
(ReadableOutputs), so a run stopped early shows how far it came.
"""
import glob
import json
import os
import re
import sys
import time

import numpy as np

from util.errors import UserError
from util.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from util.io import atomic_open, write_json, write_text

# only in the per_image.npz of an unfinished run: how many images the run will hold when it is finished
PARTIAL_KEY = 'num_images_expected'


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


def check_run_config(store, config, is_main, recorded_only=(), normalize=lambda saved: saved):
    """A rerun into a folder holding results must compute the same thing as the run it continues.
    Keys in recorded_only (e.g. checkpoint paths, which may move) are recorded but not compared; a
    changed checkpoint hash is shown with the files of both runs. normalize(saved) drops what an older
    version recorded that leaves the run as it was."""
    output_dir = store.output_dir
    path = os.path.join(output_dir, 'run_config.json')
    if os.path.exists(path) and store.has_results():
        with open(path) as f:
            saved = normalize(json.load(f))
        changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        shown = [k for k in changed if k not in recorded_only]

        def describe(k):
            file = k[:-len('_sha256')] + '_file'  # a checkpoint: name the file with its hash, then and now
            if k.endswith('_sha256') and file in recorded_only:
                return (f"{k}: {saved.get(file)} ({str(saved.get(k))[:12]}) -> {config.get(file)} "
                        f"({str(config.get(k))[:12]})")
            return f"{k}: {saved.get(k)!r} -> {config.get(k)!r}"
        if shown:
            details = '; '.join(describe(k) for k in shown[:6])
            raise UserError(f"{output_dir} holds results of a different run ({details}); "
                            f"use another --output_dir or delete it")
    elif is_main:
        write_json(path, config)


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


def loss_keys(records):
    """The per-step records of the test-time losses, '<name>_loss' (e.g. mae_loss), by name."""
    return sorted(k for k in records if k.endswith('_loss') and k != 'ce_loss')


def nan_mean(values):
    """The mean over images (axis 0) of the values that are not NaN (NaN where none is)."""
    count = np.sum(~np.isnan(values), axis=0)
    return np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)


def summarize(records, num_expected):
    """Per-step accuracy (percent) and mean losses over the records (online: and their drift)."""
    correct = records['pred'] == records['label'][:, None]
    return {
        'num_images': int(len(records['index'])),
        'num_images_expected': int(num_expected),
        'complete': bool(len(records['index']) == num_expected),
        'accuracy_per_step': (100 * correct.mean(axis=0)).tolist(),
        'cross_entropy_per_step': records['ce_loss'].mean(axis=0).tolist(),
        # NaN: the losses of images that --stop_rule stopped before their first step
        **{f'{key}_per_step': nan_mean(records[key]).tolist() for key in loss_keys(records)},
        **({'mean_steps_used': float(records['stop_step'].mean())} if 'stop_step' in records else {}),
        **({'drift': drift(records)} if 'weight_distance' in records else {}),
    }


def selection(args, run):
    """What results.json and the collector say about which images a number comes from."""
    indices = run.indices
    if args.subset_file:
        return {'images': len(indices), 'subset_file': os.path.abspath(args.subset_file),
                'subset_file_sha256': run.subset_file_sha256}
    if args.max_examples and args.max_examples < run.num_images_in_folder:
        return {'images': len(indices), 'max_examples': args.max_examples, 'subset': args.subset,
                'subset_seed': args.subset_seed}
    return {'images': len(indices), 'all': True}


def write_outputs(args, run, method, wall_time_s, images_this_run, final=True):
    """Merge every process's records and write the released files plus results.json and per_image.npz.

    Unfinished, they hold the images done so far and say so: results.json's `complete` is false, a last
    line of accuracy.txt says `partial: N of M images`, per_image.npz holds PARTIAL_KEY, and the released
    accuracy.npy (one entry per image of the set) waits for the end. final=False (after a flush) writes
    nothing before the first record or once every image is done: the script's final call does."""
    store, dataset, indices = run.store, run.dataset, run.indices
    records = store.load()
    if not final and (records is None or len(records['index']) == len(indices)):
        return None
    summary = summarize(records, len(indices))
    records['filename'] = np.array([os.path.relpath(dataset.samples[i][0], args.data_path)
                                    for i in records['index']])
    if summary['complete']:
        store.finalize(records)
    else:
        with atomic_open(store.final_path, 'wb') as f:
            np.savez(f, **records, **{PARTIAL_KEY: len(indices)})
    partial = '' if summary['complete'] else f"partial: {summary['num_images']} of {len(indices)} images\n"
    steps = summary['accuracy_per_step']
    args_line = str(args)
    if method == 'baseline':
        write_text(os.path.join(args.output_dir, 'accuracy.txt'),
                   f"{args_line}\n{steps[0]} {summary['cross_entropy_per_step'][0]}\n{partial}")
        if summary['complete']:  # the released content: 0 or 100 per image
            with atomic_open(os.path.join(args.output_dir, 'accuracy.npy'), 'wb') as f:
                np.save(f, 100. * (records['pred'][:, 0] == records['label']))
    else:
        # released numbering: line i is the accuracy after i + 1 steps (step 0 is in results.json)
        write_text(os.path.join(args.output_dir, 'accuracy.txt'),
                   args_line + '\n' + ''.join(f"{i}\t{a}\n" for i, a in enumerate(steps[1:])) + partial)
    result = {'method': method, 'data_path': os.path.abspath(args.data_path), **summary,
              'selection': selection(args, run), 'dataset_name': args.dataset_name,
              'online': run.online is not None,
              'steps_per_example': getattr(args, 'steps_per_example', 0),
              'wall_time_s': wall_time_s,
              'images_per_s': images_this_run / wall_time_s if wall_time_s > 0 else None,
              'seconds_per_image': float(records['seconds'].mean()),
              # the device time of every process together, resumed parts included: the sum over images
              'device_seconds': float(records['seconds'].sum()), **run.device_record(),
              'checkpoints': {k: {'file': os.path.abspath(getattr(args, k)), 'sha256': sha256}
                              for k, sha256 in run.checkpoint_sha256.items()},
              'args': json.loads(json.dumps(vars(args), default=str))}
    if method == 'baseline':
        result.update(accuracy=steps[0], loss=summary['cross_entropy_per_step'][0])
    write_json(os.path.join(args.output_dir, 'results.json'), result)
    if final:
        print(f"{method}: {summary['num_images']}/{len(indices)} images, accuracy per step: "
              + ' '.join(f"{a:.2f}" for a in steps))
    return result


class ReadableOutputs:
    """The readable outputs of a run under way: update() after a flush rewrites them with the images done so
    far, marked partial, and the end of its `with` block (the loop finished, an error or a stop signal)
    rewrites them once more, so a run stopped by a time limit or kill -9 shows how far it came. A rewrite reads and writes
    every record so far, so update() waits until 20 times the last rewrite's duration has passed since it
    ended: under 5% of the run's time, also for the baseline's flush after every batch. Only the main
    process writes."""

    def __init__(self, args, run, method, main_process):
        self.args, self.run, self.method, self.main_process = args, run, method, main_process
        self.start, self.last_end, self.last_took = time.time(), 0., 0.

    def update(self, force=False):
        begin = time.time()
        if self.main_process and (force or begin - self.last_end >= 20 * self.last_took):
            write_outputs(self.args, self.run, self.method, begin - self.start,
                          self.run.store.records_written * self.args.world_size, final=False)
            self.last_end = time.time()
            self.last_took = self.last_end - begin

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.update(force=True)


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


def natural_key(name):
    """Names compared with their numbers as numbers: frame_2 before frame_10."""
    return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in re.split(r'(\d+)', name)]
