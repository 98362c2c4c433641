"""Test-time training with masked autoencoders on one folder of test images (docs/method.md).

Each process adapts a disjoint share of the images (the released loop did not split them: every
process adapted every image); the per-image learning rate is blr * batch_size * accum_iter / 256
whatever the number of processes, since every image is still adapted alone (the released code also
multiplied by the world size, which on one GPU is 1).
"""
import time

import torch

from engine_test_time import FINETUNE_MODES, OPTIMIZERS, TestTimeTrainer, run_test_time_training
from models_mae import build_model
from util import distributed
from util.cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE_FLOAT, POSITIVE_INT,
                      ArgumentParser, UserError, add_data_args, add_model_args, add_run_args, add_test_time_args,
                      number, run_main)
from util.datasets import TestTimeDataset, imagenet_subset
from util.logger import tensorboard_writer
from util.reconstructions import Reconstructions
from util.results import readable_outputs, write_outputs
from util.run_setup import prepare_run


def get_args_parser():
    parser = ArgumentParser('Test-time training with masked autoencoders', prog='main_test_time_training.py',
                            resolve=resolve_defaults)
    group = parser.add_argument_group('test-time training')
    group.add_argument('--batch_size', default=128, type=POSITIVE_INT, help='views of the image per step')
    group.add_argument('--accum_iter', default=1, type=POSITIVE_INT, help='micro-batches of views per step')
    group.add_argument('--steps_per_example', default=None, type=NON_NEGATIVE_INT,
                       help='optimiser steps per image (None: 20; --online: 1)')
    group.add_argument('--mask_ratio', default=0.75, type=OPEN_FRACTION, help='fraction of patches removed')
    group.add_argument('--single_crop', action='store_true',
                       help='every view is the eval crop (the paper); otherwise random resized crops + flips')
    group.add_argument('--no_single_crop', action='store_false', dest='single_crop',
                       help='random resized crops + flips (the default; the released flag)')
    group.add_argument('--finetune_mode', default=None, choices=FINETUNE_MODES,
                       help='what adapts: encoder = everything but the decoder (the paper); all = the decoder '
                            'too; encoder_no_cls_no_msk = the encoder without cls_token and mask_token '
                            '(None: encoder; --online: all)')
    group.add_argument('--optimizer_type', default=None, choices=OPTIMIZERS,
                       help='sgd (the paper: momentum --optimizer_momentum, no weight decay), adam or adam_w '
                            '(betas 0.9, 0.95) (None: sgd; --online: adam_w)')
    group.add_argument('--optimizer_momentum', default=0.9, type=number(float, 0, 1, high_open=True),
                       help='SGD momentum')
    group.add_argument('--weight_decay', default=None, type=NON_NEGATIVE_FLOAT,
                       help="weight decay of adam_w (None: 0.01, AdamW's default, as the released code; --online: 0.05)")
    group.add_argument('--lr', default=None, type=POSITIVE_FLOAT,
                       help='absolute lr (None: blr * batch_size * accum_iter / 256; --online without --blr: 1e-4)')
    group.add_argument('--blr', default=None, type=POSITIVE_FLOAT,
                       help='base lr, scaled by the views per step / 256 (None: 1e-2)')
    group.add_argument('--encoder_lr_scale', default=None, type=POSITIVE_FLOAT,
                       help="the encoder's weights step at this times the lr; the decoder and mask_token at the lr "
                            '(None: 1; --online: 0.1)')
    group.add_argument('--clip_grad', default=None, type=NON_NEGATIVE_FLOAT,
                       help="clip each image's gradient (all its adapted weights) to this L2 norm before each step; "
                            '0: no clipping (None: 0; --online: 1)')
    group.add_argument('--parallel_images', default=1, type=POSITIVE_INT,
                       help='adapt this many images at once as independent weight sets (the same results '
                            'up to float rounding); pays for small models, e.g. 4 with --compile on a CPU')
    group.add_argument('--compile', action='store_true',
                       help='compile the step (forward, loss, backward), the optimiser update and the '
                            'classification into fused kernels (CUDA graphs on a GPU); the same function up to '
                            'float rounding, minutes of compilation the first time (docs/performance.md)')
    group.add_argument('--flush_every', default=10, type=POSITIVE_INT, help='save results every N images')
    group.add_argument('--verbose', action='store_true',
                       help="print every step's reconstruction and classification loss of each image once it is "
                            'done (the released lines)')
    group.add_argument('--save_reconstructions', default=0, type=NON_NEGATIVE_INT,
                       help='for the first N images, a PNG of the masked input and the reconstruction as TTT proceeds '
                            '(OUT/reconstructions/)')
    group = parser.add_argument_group('online TTT-MAE (docs/online.md)')
    group.add_argument('--online', action='store_true',
                       help='carry the weights from image to image instead of resetting them; the defaults marked '
                            "--online become the follow-up work's recipe for streams")
    group.add_argument('--online_keep_optimizer', action='store_true',
                       help='online: carry the optimiser state from image to image too (default: a fresh optimiser '
                            "state for every image, as the follow-up work's --restart_optimizer)")
    group.add_argument('--online_reset_every', default=0, type=NON_NEGATIVE_INT,
                       help='online: back to the loaded weights every N images of the stream (0: never)')
    group.add_argument('--online_anchor', default=0., type=NON_NEGATIVE_FLOAT,
                       help='online: add anchor/2 * ||w - w0||^2 (w0 the loaded weights) to the loss, a pull toward '
                            'the source weights')
    group.add_argument('--online_restore', default=0., type=number(float, 0, 1),
                       help='online: after every step, each adapted weight goes back to its loaded value with this '
                            'probability (stochastic restore)')
    group.add_argument('--online_window', default=None, type=POSITIVE_INT,
                       help="online: each step's views are spread over the last K images (the current one and the "
                            "K-1 before it); 1 = plain online TTT-MAE (None: 16 with --online)")
    group.add_argument('--online_ema', default=0., type=number(float, 0, 1, high_open=True),
                       help='online: classify with an exponential moving average of the adapted weights, updated '
                            'after every step with this momentum (0: the adapted weights themselves)')
    group.add_argument('--stream_order', default=None, choices=['shuffled', 'listed'],
                       help='online: the stream is the images shuffled with --seed, or in the order listed (the '
                            "folder's, or --subset_file's); None: listed with --subset_file, else shuffled")
    add_model_args(parser)
    add_test_time_args(parser)
    add_data_args(parser, 'folder of one test set, <data_path>/<class>/<image>, e.g. imagenet-c/fog/5')
    add_run_args(parser)
    return parser


# Defaults that differ between episodic TTT-MAE (the paper's released recipe) and --online (the follow-up
# work's recipe for streams, docs/online.md); a flag given on the command line wins either way.
RECIPES = {'steps_per_example': (20, 1), 'finetune_mode': ('encoder', 'all'), 'optimizer_type': ('sgd', 'adam_w'),
           'weight_decay': (0.01, 0.05), 'encoder_lr_scale': (1., 0.1), 'clip_grad': (0., 1.), 'online_window': (1, 16)}
ONLINE_LR = 1e-4


def resolve_defaults(args):
    """The defaults that depend on other flags, filled in as the flags are parsed."""
    for name, (episodic, online) in RECIPES.items():
        if getattr(args, name) is None:
            setattr(args, name, online if args.online else episodic)
    online_lr = args.online and args.blr is None  # --online's own lr unless a base lr is given
    if args.blr is None:
        args.blr = 1e-2
    if args.lr is None:
        args.lr = ONLINE_LR if online_lr else args.blr * args.batch_size * args.accum_iter / 256
    if args.online and args.stream_order is None:
        args.stream_order = 'listed' if args.subset_file else 'shuffled'


def check_args(args):
    """Flag combinations that cannot run together."""
    if args.amp == 'fp16' and (args.parallel_images > 1 or args.compile):
        raise UserError("--amp fp16 runs one image at a time without --compile (its loss scale is per image); "
                        "use --amp bf16 with --parallel_images or --compile")
    online_only = [f'--{k}' for k in ('online_keep_optimizer', 'stream_order', 'online_reset_every', 'online_anchor',
                                      'online_restore', 'online_ema') if getattr(args, k)]
    online_only += ['--online_window'] if args.online_window > 1 else []
    if online_only and not args.online:
        raise UserError(f"{', '.join(online_only)} only apply with --online")
    if args.online and args.parallel_images > 1:
        raise UserError("--online adapts one stream image after image: it cannot take --parallel_images")


def main(args):
    check_args(args)
    run = prepare_run(args, build_model)
    print(f"lr per image: {args.lr:.3g} (independent of the number of processes)")
    if run.todo is None:
        distributed.destroy()
        return
    device = run.device
    trainer = TestTimeTrainer(run.model, args, device, k=args.parallel_images,
                              class_subset=imagenet_subset(args.dataset_name))
    load_items = lambda indices: TestTimeDataset(run.dataset.samples, indices, args.input_size, raw=not args.single_crop)
    if run.online:  # the carried state, and the window of images before where the stream continues
        run.online.resume(trainer, load_items)
    loader = torch.utils.data.DataLoader(load_items(run.todo), batch_size=None, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and device.type == 'cuda')
    observe = Reconstructions(args, run.dataset, run.indices[:args.save_reconstructions]) \
        if args.save_reconstructions else None
    log_writer = tensorboard_writer(args.log_dir)
    run.store.verbose = args.verbose
    start = time.time()
    with readable_outputs(args, run, 'ttt', distributed.is_main_process()):
        done = run_test_time_training(trainer, loader, run.store, args, log_writer, run.online, observe)
    distributed.barrier()
    if distributed.is_main_process():
        result = write_outputs(args, run, 'ttt', time.time() - start, done * args.world_size)
        if log_writer is not None:
            for step, acc in enumerate(result['accuracy_per_step']):
                log_writer.add_scalar('ttt/accuracy_per_step', acc, step)
            log_writer.close()
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
