"""The output files of a test-time run, from its per-image records: the released accuracy.txt / accuracy.npy,
results.json (per-step summaries) and per_image.npz, rewritten while the run is under way (ReadableOutputs)
so that a run stopped early shows how far it came."""
import json
import os
import time

import numpy as np

from util.image_selection import describe_selection
from util.io import atomic_open, write_json, write_text
from util.records import PARTIAL_KEY


def loss_keys(records):
    """The per-step records of the test-time losses, '<name>_loss' (e.g. mae_loss), by name."""
    return sorted(k for k in records if k.endswith('_loss') and k != 'ce_loss')


def nan_mean(values):
    """The mean over images (axis 0) of the values that are not NaN (NaN where none is)."""
    count = np.sum(~np.isnan(values), axis=0)
    return np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)


def summarize(records, num_expected):
    """Per-step accuracy (percent) and mean losses over the records."""
    correct = records['pred'] == records['label'][:, None]
    return {
        'num_images': int(len(records['index'])),
        'num_images_expected': int(num_expected),
        'complete': bool(len(records['index']) == num_expected),
        'accuracy_per_step': (100 * correct.mean(axis=0)).tolist(),
        'cross_entropy_per_step': records['ce_loss'].mean(axis=0).tolist(),
        # NaN: the losses of images that --stop_rule stopped before their first step
        **{f'{key}_per_step': nan_mean(records[key]).tolist() for key in loss_keys(records) + ['objective']
           if key in records},
        **({'mean_steps_used': float(records['stop_step'].mean())} if 'stop_step' in records else {}),
    }


def write_outputs(args, run, method, wall_time_s, images_this_run, final=True, more=None):
    """Merge every process's records and write the released files plus results.json and per_image.npz;
    more(records), if given, adds to results.json (online TTT-MAE: its drift).

    Unfinished, they hold the images done so far and say so: results.json's `complete` is false, a last
    line of accuracy.txt says `partial: N of M images`, per_image.npz holds PARTIAL_KEY, and the released
    accuracy.npy (one entry per image of the set) waits for the end. final=False (after a flush) writes
    nothing before the first record or once every image is done: the script's final call does."""
    store, dataset, indices = run.store, run.dataset, run.indices
    records = store.load()
    if not final and (records is None or len(records['index']) == len(indices)):
        return None
    summary = {**summarize(records, len(indices)), **(more(records) if more else {})}
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
              'selection': describe_selection(args, run.indices, run.num_images_in_folder, run.subset_file_sha256),
              'dataset_name': args.dataset_name,
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
    rewrites them once more, so a run stopped by a time limit or kill -9 shows how far it came. A rewrite
    reads and writes every record so far, so update() waits until 20 times the last rewrite's duration has passed since it
    ended: under 5% of the run's time, also for the baseline's flush after every batch. Only the main
    process writes. more: as write_outputs'."""

    def __init__(self, args, run, method, main_process, more=None):
        self.args, self.run, self.method, self.main_process, self.more = args, run, method, main_process, more
        self.start, self.last_end, self.last_took = time.time(), 0., 0.

    def update(self, force=False):
        begin = time.time()
        if self.main_process and (force or begin - self.last_end >= 20 * self.last_took):
            write_outputs(self.args, self.run, self.method, begin - self.start,
                          self.run.store.records_written * self.args.world_size, final=False, more=self.more)
            self.last_end = time.time()
            self.last_took = self.last_end - begin

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.update(force=True)
