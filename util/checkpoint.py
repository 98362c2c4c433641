"""Checkpoint I/O: safe loading, atomic saving, resume, and the test-time model assembly."""
import argparse
import glob
import os
import pickle
import re

import numpy as np
import torch

from util.errors import UserError
from util.io import atomic_path
from util.pos_embed import interpolate_pos_embed


def _allowed_globals():
    """What a training checkpoint may hold besides tensors: its argparse args and numpy scalars."""
    multiarray = (np._core if hasattr(np, '_core') else np.core).multiarray  # numpy 2 / numpy 1 (a GPU image's)
    allowed = [argparse.Namespace, np.dtype, np.ndarray,
               (multiarray.scalar, 'numpy.core.multiarray.scalar'),
               (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
               multiarray.scalar, multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return allowed


def load_checkpoint(path, what='checkpoint'):
    """torch.load with weights_only=True and an allow-list: a checkpoint is untrusted input. Errors name
    the file and what is wrong with it, never torch's advice to load untrusted pickles unsafely."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} not found: {path!r}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        if found:  # a pickled object outside the allow-list: loading it could run code
            raise UserError(f"refusing to load {what} {path}: it holds a pickled {found.group(1)}, which a "
                            f"checkpoint of tensors, argparse.Namespace and numpy values does not need "
                            f"(unpickling it could run code)") from None
        detail = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', str(e))
        raise UserError(f"cannot read {what} {path} (corrupt, or not a PyTorch checkpoint)"
                        + (f": {detail.group(1).strip()}" if detail else '')) from None
    except Exception as e:  # truncated or not a checkpoint: RuntimeError, EOFError (empty), IndexError (text) ...
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise UserError(f"cannot read {what} {path} (truncated, or not a PyTorch checkpoint): "
                        f"{type(e).__name__}: {first_line}") from None


def model_state(checkpoint):
    """The state_dict inside a checkpoint ({'model': ...}), or the checkpoint if it is a bare one."""
    return checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint


def _key_summary(keys, limit=12):
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_state_dict_strict(model, state_dict, source):
    """Load exactly: every key present, none extra, shapes equal; the error names the keys."""
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_key_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_summary(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_key_summary(mismatched, 4)}")
    if problems:
        raise UserError(f"{source} does not fit the model: " + '; '.join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_test_checkpoints(model, resume_model, resume_finetune, head_type):
    """The test-time model's state (docs/method.md): the MAE checkpoint (encoder + decoder) plus the head
    of the probe checkpoint, and the probe's class names in label order (None if it records none). Which
    keys are the head, and the names of other probe layouts (MAE's linear probe), the model says
    (its parts())."""
    parts = model.parts()
    state = {k: v for k, v in model_state(load_checkpoint(resume_model, 'MAE checkpoint (--resume_model)')).items()
             if not k.startswith(parts.head)}  # a head saved by pre-training is never the trained one
    probe_checkpoint = load_checkpoint(resume_finetune, 'probe checkpoint (--resume_finetune)')
    own = [k for k in model.state_dict() if k.startswith(parts.head)]
    modules = {k.split('.')[0] for k in own}  # this head's modules (a probe may hold another head's too)
    head = {parts.probe_keys.get(k, k): v for k, v in model_state(probe_checkpoint).items()}
    head = {k: v for k, v in head.items() if k.startswith(parts.head) and k.split('.')[0] in modules}
    if not head:
        raise UserError(f"probe checkpoint {resume_finetune} holds no {head_type} weights (none of "
                        f"{_key_summary(own, 3)})")
    state.update(head)
    classes = probe_checkpoint.get('classes') if isinstance(probe_checkpoint, dict) else None
    return state, classes


def load_finetune_for_probe(model, path):
    """Encoder weights for probing: drop the decoder (and any head: the probe trains a fresh one),
    resize pos_embed, load non-strictly."""
    state = dict(model_state(load_checkpoint(path, 'pre-trained checkpoint (--finetune)')))
    parts = model.parts()
    for k in [k for k in state if k.startswith(parts.decoder_side + parts.head)]:
        del state[k]
    interpolate_pos_embed(model, state)
    own = model.state_dict()
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise UserError(f"{path} does not fit the model: shape mismatch for {_key_summary(mismatched)}")
    msg = model.load_state_dict(state, strict=False)
    if msg.unexpected_keys:
        raise UserError(f"{path} does not fit the model: unexpected keys: {_key_summary(msg.unexpected_keys)}")
    encoder_missing = [k for k in msg.missing_keys if not k.startswith(parts.head)]
    if encoder_missing:
        raise UserError(f"{path} lacks encoder weights: missing keys: {_key_summary(encoder_missing)}")
    print(f"Loaded {path}; left at initialisation: {_key_summary(msg.missing_keys, 6)}")


# ---- training checkpoints ----

def checkpoint_path(output_dir, epoch):
    return os.path.join(output_dir, f'checkpoint-{epoch}.pth')


def save_checkpoint(path, model, optimizer, epoch, scaler, args, classes=None):
    """Atomic torch.save (temp + rename), so the newest checkpoint is never a broken one. A probe's
    checkpoint also holds its head's class names in label order ('classes')."""
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'scaler': scaler.state_dict(), 'args': args, **({'classes': list(classes)} if classes else {})}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def numbered_checkpoints(output_dir):
    """[(epoch, path)] of output_dir's checkpoint-{epoch}.pth files, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        m = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    """The checkpoint with the highest epoch number in output_dir, or None."""
    found = numbered_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir, keep):
    """Remove all but the newest `keep` numbered checkpoints (checkpoint-final.pth stays)."""
    for _, path in numbered_checkpoints(output_dir)[:-keep]:
        os.remove(path)


def resume_training(args, model, optimizer, scaler, older=None):
    """Load --resume, or else the newest checkpoint in --output_dir; sets args.start_epoch. older(state,
    model), if given, reads weights an older version saved (util/compat.py). Returns the path loaded, or None."""
    path = args.resume or (latest_checkpoint(args.output_dir) if args.output_dir else None)
    if not path:
        return None
    checkpoint = load_checkpoint(path, 'checkpoint to resume (--resume)')
    state = older(model_state(checkpoint), model) if older else model_state(checkpoint)
    load_state_dict_strict(model, state, path)
    if 'optimizer' in checkpoint and 'epoch' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
        args.start_epoch = checkpoint['epoch'] + 1
        if 'scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['scaler'])
    print(f"Resumed from {path} (next epoch {args.start_epoch})")
    return path
