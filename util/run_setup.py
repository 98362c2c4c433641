"""Set-up of a test-time run (TTT or the baseline): processes, precision, the test images, the combined
model, and which images are left to do."""
import json
import os

import torch

from util import distributed
from util.cli import UserError, make_output_dir
from util.results import ResultStore, check_run_config, select_indices

# flags that do not change per-image results: a rerun may change them and still continue
RUN_ONLY_ARGS = {'output_dir', 'log_dir', 'device', 'num_workers', 'pin_mem', 'world_size', 'local_rank',
                 'rank', 'gpu', 'distributed', 'dist_url', 'flush_every', 'print_freq',
                 'data_path', 'resume_model', 'resume_finetune'}


def set_precision(device, strict_fp32):
    """TF32 on CUDA as the released PyTorch 1.11 ran it, unless strict fp32 is asked for."""
    if torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = not strict_fp32
        torch.backends.cudnn.allow_tf32 = not strict_fp32


def run_config(args):
    """The settings a run's per-image results depend on (recorded in run_config.json)."""
    config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS}
    config.update(data=os.path.abspath(args.data_path), resume_model=os.path.basename(args.resume_model),
                  resume_finetune=os.path.basename(args.resume_finetune),
                  device_type=torch.device(args.device).type)  # CPU and CUDA generators draw other masks
    return config


def build_test_model(args, device):
    """The MAE checkpoint plus the probe's head, loaded strictly (docs/method.md, checkpoints)."""
    from models_mae import build_model
    from util.checkpoint import combined_state_dict, load_state_dict_strict
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=getattr(args, 'norm_pix_loss', False),
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes)
    args.input_size = model.patch_embed.img_size[0]
    state = combined_state_dict(args.resume_model, args.resume_finetune, args.head_type)
    load_state_dict_strict(model, state, f"{args.resume_model} + {args.resume_finetune}")
    return model.to(device)


def load_test_set(args):
    from util.datasets import ImageFolder
    imagenet = True if args.dataset_name.lower().startswith('imagenet') else None
    dataset = ImageFolder(args.data_path, imagenet_labels=imagenet)
    if len(dataset) == 0:
        raise UserError(f"no images in {args.data_path}")
    largest = max(dataset.class_to_idx.values())
    if largest >= args.num_classes:
        raise UserError(f"label {largest} of {args.data_path} does not fit --num_classes {args.num_classes}")
    return dataset


def prepare_run(args):
    """The shared start of both test-time scripts: processes, precision, data, model, and the images
    this process has to do.

    Returns (device, dataset, indices, model, store, todo); todo is None when the run is finished.
    """
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    set_precision(device, args.strict_fp32)
    dataset = load_test_set(args)
    indices = select_indices(len(dataset), args.max_examples, args.subset, args.subset_seed)
    model = build_test_model(args, device)
    make_output_dir(args.output_dir)
    store = ResultStore(args.output_dir, args.rank)
    check_run_config(store, run_config(args), distributed.is_main_process())
    # rank 0 decides what is left and tells the others, so all shard the same list
    todo = [images_to_do(store, indices) if distributed.is_main_process() else None]
    distributed.broadcast_object(todo)
    todo = todo[0]
    return device, dataset, indices, model, store, None if todo is None else todo[args.rank::args.world_size]


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
