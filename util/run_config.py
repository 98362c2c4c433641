"""A test-time run's recorded settings (OUT/run_config.json): what its per-image results depend on, and the
check that a rerun into the same folder computes the same thing as the run it continues."""
import json
import os

import torch

from util.compat import settings_as_now
from util.errors import UserError
from util.io import write_json

# flags that do not change per-image results: a rerun may change them and still continue
RUN_ONLY_ARGS = {'output_dir', 'log_dir', 'device', 'num_workers', 'pin_mem', 'world_size', 'local_rank',
                 'rank', 'gpu', 'distributed', 'dist_url', 'flush_every', 'print_freq',
                 'data_path', 'resume_model', 'resume_finetune', 'save_reconstructions', 'verbose', 'dist_on_itp'}
# recorded but not compared: checkpoints may move (their SHA-256 is compared)
MOVABLE = {'resume_model_file', 'resume_finetune_file'}


def run_config(args, checkpoint_sha256, subset_file_sha256=None, settings=None):
    """The settings a run's per-image results depend on. The checkpoints (and a --subset_file) are identified
    by their SHA-256, so that another file of the same name is not taken for them; `settings` adds what a
    protocol's results depend on beyond the flags (online TTT-MAE: the number of streams)."""
    config = settings_as_now({k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS})
    if subset_file_sha256:
        config['subset_file_sha256'] = subset_file_sha256
    # device_type: CPU and CUDA generators draw other masks
    config.update(data=os.path.abspath(args.data_path), device_type=torch.device(args.device).type)
    for key, sha256 in checkpoint_sha256.items():
        config[f'{key}_sha256'] = sha256
        config[f'{key}_file'] = os.path.abspath(getattr(args, key))
    config.update(settings or {})
    return config


def check_run_config(store, config, is_main):
    """A rerun into a folder holding results must compute the same thing as the run it continues; the first
    run records its config. A changed checkpoint hash is shown with the files of both runs."""
    output_dir = store.output_dir
    path = os.path.join(output_dir, 'run_config.json')
    if os.path.exists(path) and store.has_results():
        with open(path) as f:
            saved = settings_as_now(json.load(f))
        changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        shown = [k for k in changed if k not in MOVABLE]

        def describe(k):
            file = k[:-len('_sha256')] + '_file'  # a checkpoint: name the file with its hash, then and now
            if k.endswith('_sha256') and file in MOVABLE:
                return (f"{k}: {saved.get(file)} ({str(saved.get(k))[:12]}) -> {config.get(file)} "
                        f"({str(config.get(k))[:12]})")
            return f"{k}: {saved.get(k)!r} -> {config.get(k)!r}"
        if shown:
            details = '; '.join(describe(k) for k in shown[:6])
            raise UserError(f"{output_dir} holds results of a different run ({details}); "
                            f"use another --output_dir or delete it")
    elif is_main:
        write_json(path, config)
