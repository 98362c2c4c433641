"""Test-time training with masked autoencoders on one folder of test images (docs/method.md).

Each process adapts a disjoint share of the images (the released loop did not split them: every
process adapted every image); the per-image learning rate is blr * batch_size * accum_iter / 256
whatever the number of processes, since every image is still adapted alone (the released code also
multiplied by the world size, which on one GPU is 1). Online TTT-MAE has its own script, main_online_ttt.py.
"""
import argparse
import time

import torch

from engine_fast import make_trainer
from engine_test_time import Episodic, run_test_time_training
from models_mae import build_model
from util import distributed
from util.cli import (POSITIVE_INT, ArgumentParser, UserError, add_adaptation_args, add_data_args, add_model_args,
                      add_run_args, add_test_time_args, run_main)
from util.datasets import TestTimeDataset, imagenet_subset
from util.logger import tensorboard_writer
from util.reconstructions import Reconstructions
from util.results import ReadableOutputs, write_outputs
from util.run_setup import prepare_run


class OnlineHasItsOwnScript(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("online TTT-MAE has its own script: python main_online_ttt.py, with the same flags "
                     "(docs/online.md)")


def get_args_parser():
    parser = ArgumentParser('Test-time training with masked autoencoders', prog='main_test_time_training.py',
                            resolve=resolve_lr)
    group = add_adaptation_args(parser, steps=20, finetune_mode='encoder', optimizer_type='sgd', weight_decay=0.01,
                                lr=None)
    group.add_argument('--parallel_images', default=1, type=POSITIVE_INT,
                       help='adapt this many images at once as independent weight sets (the same results '
                            'up to float rounding); pays for small models, e.g. 4 with --compile on a CPU')
    group.add_argument('--compile', action='store_true',
                       help='compile the step (forward, loss, backward) and the classification into fused kernels '
                            '(CUDA graphs on a GPU); the same function up to float rounding, minutes of compilation '
                            'the first time (docs/performance.md)')
    group.add_argument('--online', nargs=0, action=OnlineHasItsOwnScript, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add_model_args(parser)
    add_test_time_args(parser)
    add_data_args(parser, 'folder of one test set, <data_path>/<class>/<image>, e.g. imagenet-c/fog/5')
    add_run_args(parser)
    return parser


def resolve_lr(args):
    """The released lr rule, as the flags are parsed: the lr of one image's views."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter / 256


def check_args(args):
    """Flag combinations that cannot run together."""
    if args.amp == 'fp16' and (args.parallel_images > 1 or args.compile):
        raise UserError("--amp fp16 runs one image at a time without --compile (its loss scale is per image); "
                        "use --amp bf16 with --parallel_images or --compile")
    if args.stop_rule and (args.parallel_images > 1 or args.compile):
        raise UserError("--stop_rule stops images one at a time in the default loop: drop --parallel_images and "
                        "--compile")
    check_stop_rule(args)


def check_stop_rule(args):
    if args.stop_rule and args.stop_rule[0] == 'fixed' and args.stop_rule[1] > args.steps_per_example:
        raise UserError(f"--stop_rule fixed:{args.stop_rule[1]} stops after more steps than --steps_per_example "
                        f"{args.steps_per_example}")


def main(args):
    check_args(args)
    run_ttt(args, make_trainer)


def run_ttt(args, make_trainer, online=False):
    """Set up a run (episodic or online), adapt to every image left to do, write the outputs."""
    run = prepare_run(args, build_model, online)
    print(f"lr per image: {args.lr:.3g} (independent of the number of processes)")
    if online and args.world_size > 1:
        print(f"note: {args.world_size} processes run {args.world_size} streams, each over a contiguous share of "
              f"the images (one stream: one process)")
    if run.todo is None:
        distributed.destroy()
        return
    trainer = make_trainer(run.model, args, run.device, class_subset=imagenet_subset(args.dataset_name))
    load_items = lambda indices: TestTimeDataset(run.dataset.samples, indices, args.input_size, raw=not args.single_crop)
    stream = run.online or Episodic()
    if online:  # the carried state, and the window of images before where the stream continues
        run.online.resume(trainer, load_items)
    loader = torch.utils.data.DataLoader(load_items(run.todo), batch_size=None, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and run.device.type == 'cuda')
    figures = Reconstructions(args, run.dataset, run.indices[:args.save_reconstructions]) \
        if args.save_reconstructions else None
    log_writer = tensorboard_writer(args.log_dir)
    start = time.time()
    with ReadableOutputs(args, run, 'ttt', distributed.is_main_process()) as outputs:
        done = run_test_time_training(trainer, loader, run.store, outputs, args, stream, figures, log_writer)
    distributed.barrier()
    if distributed.is_main_process():
        result = write_outputs(args, run, 'ttt', time.time() - start, done * args.world_size)
        if log_writer is not None:
            for key in [k for k in result if k.endswith('_per_step')]:  # accuracy, cross-entropy, each loss
                for step, value in enumerate(result[key]):
                    log_writer.add_scalar(f'ttt/{key}', value, step)
            log_writer.close()
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
