"""Set-up of a test-time run (TTT or the baseline): processes, precision, the test images, the combined
model, and which images are left to do."""
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from util import distributed
from util.checkpoint import load_checkpoint, load_state_dict_strict, load_test_checkpoints, model_state
from util.cli import make_output_dir
from util.errors import UserError
from util.datasets import ImageFolder, class_folders, folder_labels, imagenet_wnids
from util.online import OnlineStream
from util.results import ResultStore, check_run_config, select_indices

# flags that do not change per-image results: a rerun may change them and still continue
RUN_ONLY_ARGS = {'output_dir', 'log_dir', 'device', 'num_workers', 'pin_mem', 'world_size', 'local_rank',
                 'rank', 'gpu', 'distributed', 'dist_url', 'flush_every', 'print_freq',
                 'data_path', 'resume_model', 'resume_finetune', 'save_reconstructions', 'verbose'}
# flags added after results folders were first recorded, or that the paper's script no longer has since online
# TTT-MAE has its own: left out where they leave the run as it was, so that a folder an older version made
# is still continued
NEUTRAL_FLAGS = {'encoder_lr_scale': 1., 'clip_grad': 0., 'online_ema': 0., 'online': False, 'online_window': 1,
                 'online_keep_optimizer': False, 'online_reset_every': 0, 'online_anchor': 0., 'online_restore': 0.,
                 'stream_order': None}


def without_neutral_flags(config):
    return {k: v for k, v in config.items() if not (k in NEUTRAL_FLAGS and v == NEUTRAL_FLAGS[k])}


def set_precision(device, strict_fp32):
    """TF32 on CUDA as the released PyTorch 1.11 ran it, unless strict fp32 is asked for."""
    if torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = not strict_fp32
        torch.backends.cudnn.allow_tf32 = not strict_fp32


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Run:
    """What a test-time run's set-up found and decided (args stays what the user typed)."""
    device: torch.device
    dataset: object  # util.datasets.ImageFolder
    indices: np.ndarray  # every selected image, in evaluation order
    model: torch.nn.Module
    store: object  # util.results.ResultStore
    checkpoint_sha256: dict  # {'resume_model': ..., 'resume_finetune': ...}
    subset_file_sha256: Optional[str]
    num_images_in_folder: int
    todo: Optional[list] = None  # this process's images left, None when the run is finished
    online: Optional[OnlineStream] = None

    def device_record(self):
        """What results.json records of the device: its name, the torch version and (on a GPU) this process's
        peak memory held by tensors."""
        cuda = self.device.type == 'cuda'
        return {'device': torch.cuda.get_device_name(self.device) if cuda else platform.processor() or 'cpu',
                'torch': torch.__version__,
                'peak_memory_gib': torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if cuda else None}


def run_config(args, checkpoint_sha256, subset_file_sha256=None, online=False):
    """The settings a run's per-image results depend on (recorded in run_config.json). The checkpoints
    (and a --subset_file) are identified by their SHA-256, so that another file of the same name is not
    taken for them."""
    config = without_neutral_flags({k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS})
    if subset_file_sha256:
        config['subset_file_sha256'] = subset_file_sha256
    # device_type: CPU and CUDA generators draw other masks
    config.update(data=os.path.abspath(args.data_path), device_type=torch.device(args.device).type)
    for key, sha256 in checkpoint_sha256.items():
        config[f'{key}_sha256'] = sha256
        config[f'{key}_file'] = os.path.abspath(getattr(args, key))
    if online:  # each process runs its own stream: their number changes the results
        config.update(online=True, online_processes=args.world_size)
    return config


def head_classes(args, probe_classes, num_outputs):
    """The head's class names in label order: --classes, else the probe's record, else (a released probe,
    1000 outputs) the ImageNet-1k wnids."""
    if args.classes:
        try:
            with open(args.classes) as f:
                classes = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --classes {args.classes}: {e.strerror}") from None
        if not classes or len(classes) > num_outputs:
            raise UserError(f"--classes {args.classes} lists {len(classes)} classes; the head has {num_outputs} outputs")
        return classes
    if probe_classes:
        return list(probe_classes)
    if num_outputs == 1000:
        return imagenet_wnids()
    raise UserError(f"{args.resume_finetune} records no class names and its head is not a 1000-class ImageNet head: "
                    f"pass --classes FILE, the head's class names in label order, one per line")


def build_test_model(args, device, build_model):
    """The MAE checkpoint plus the probe's head, loaded strictly (docs/method.md), and the head's classes;
    or a fine-tuned ViT (models_vit.py) from its own checkpoint alone. build_model: models_mae.build_model
    (passed in: util/ does not import the model)."""
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=getattr(args, 'norm_pix_loss', False),
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes)
    args.input_size = model.patch_embed.img_size[0]
    if getattr(model, 'takes_test_time_training', True):
        if not args.resume_model:
            raise UserError(f"--model {args.model} needs --resume_model, the MAE checkpoint with its decoder")
        state, classes = load_test_checkpoints(args.resume_model, args.resume_finetune, args.head_type,
                                               model.head_prefixes)
        load_state_dict_strict(model, state, f"{args.resume_model} + {args.resume_finetune}")
    else:  # a fine-tuned ViT: one checkpoint holds it whole
        if args.resume_model:
            raise UserError(f"--model {args.model} is a fine-tuned ViT without a decoder: pass its checkpoint as "
                            f"--resume_finetune alone, without --resume_model")
        checkpoint = load_checkpoint(args.resume_finetune, 'fine-tuned ViT checkpoint (--resume_finetune)')
        load_state_dict_strict(model, model_state(checkpoint), args.resume_finetune)
        classes = checkpoint.get('classes') if isinstance(checkpoint, dict) else None
    return model.to(device), head_classes(args, classes, args.num_classes)


def load_test_set(args, classes):
    """The test folder, each class folder labelled by its index among the head's classes."""
    dataset = ImageFolder(args.data_path, labels=folder_labels(args.data_path, args.dataset_name, classes))
    if len(dataset) == 0:
        raise UserError(f"no images in {args.data_path}")
    return dataset


def select_images(args, dataset):
    """Indices of the images to evaluate: those --subset_file lists (paths relative to --data_path), in
    its order; else all of them, or --max_examples spread over the folder."""
    if not args.subset_file:
        return select_indices(len(dataset), args.max_examples, args.subset, args.subset_seed)
    try:
        with open(args.subset_file) as f:
            listed = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    except OSError as e:
        raise UserError(f"cannot read --subset_file {args.subset_file}: {e.strerror}") from None
    where = {os.path.relpath(path, args.data_path).replace(os.sep, '/'): i for i, (path, _) in enumerate(dataset.samples)}
    missing = [p for p in listed if p not in where]
    if missing or not listed:
        raise UserError(f"{len(missing)} of the {len(listed)} images --subset_file {args.subset_file} lists are not in "
                        f"{args.data_path}" + (f": {', '.join(missing[:3])}" + (' ...' if len(missing) > 3 else '')
                                               if missing else ''))
    if len(set(listed)) != len(listed):
        raise UserError(f"--subset_file {args.subset_file} lists {len(listed) - len(set(listed))} images twice")
    return np.array([where[p] for p in listed], dtype=np.int64)


def prepare_run(args, build_model, online=False):
    """The shared start of the test-time scripts: processes, precision, data, model (build_model:
    models_mae.build_model), and the images this process has to do (online: its stream). Returns a Run."""
    if args.subset_file and args.max_examples:
        raise UserError("--subset_file and --max_examples both choose the images: pass one")
    if args.max_examples is None and (args.subset != 'stride' or args.subset_seed != 0):
        raise UserError("--subset and --subset_seed choose which --max_examples images: pass --max_examples too")
    class_folders(args.data_path)  # a wrong path fails before the checkpoints are read
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    set_precision(device, args.strict_fp32)
    model, classes = build_test_model(args, device, build_model)
    dataset = load_test_set(args, classes)
    indices = select_images(args, dataset)
    checkpoint_sha256 = {k: file_sha256(getattr(args, k)) for k in ('resume_model', 'resume_finetune')
                         if getattr(args, k)}
    # recorded: another list of the same name is refused
    subset_file_sha256 = file_sha256(args.subset_file) if args.subset_file else None
    make_output_dir(args.output_dir)
    store = ResultStore(args.output_dir, args.rank)
    check_run_config(store, run_config(args, checkpoint_sha256, subset_file_sha256, online),
                     distributed.is_main_process(), recorded_only={'resume_model_file', 'resume_finetune_file'},
                     normalize=without_neutral_flags)
    run = Run(device, dataset, indices, model, store, checkpoint_sha256, subset_file_sha256, len(dataset))
    if online:  # each process continues its own stream
        run.online = OnlineStream.of_run(args, indices, store, [path for path, _ in dataset.samples])
    # rank 0 decides what is left and tells the others, so all shard the same list
    todo = [images_to_do(store, indices) if distributed.is_main_process() else None]
    distributed.broadcast_object(todo)
    if todo[0] is not None:
        run.todo = run.online.todo() if run.online else todo[0][args.rank::args.world_size]
    return run


def images_to_do(store, indices):
    """The selected images not finished yet, or None when the run is complete and written."""
    done = store.done_indices()
    todo = [int(i) for i in indices if int(i) not in done]
    results = os.path.join(store.output_dir, 'results.json')
    if not todo and os.path.exists(results):
        with open(results) as f:
            if json.load(f).get('complete'):
                print(f"all {len(indices)} images already done: results in {store.output_dir}")
                return None
    print(f"{len(indices)} images selected, {len(indices) - len(todo)} already done, {len(todo)} to do")
    return todo
