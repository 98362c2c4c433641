"""Test-time training with masked autoencoders on one folder of test images (SPEC section 5).

Each process adapts a disjoint share of the images; the per-image learning rate is
blr * batch_size * accum_iter / 256 whatever the number of processes, since every image is
still adapted alone (the released code also multiplied by the world size, which on one GPU is 1).
"""
import argparse
import time

import torch

from engine_test_time import (FINETUNE_MODES, BatchedTestTimeTrainer, TestTimeDataset, TestTimeTrainer,
                              add_test_time_args, prepare_run, run_test_time_training, write_outputs)
from util import distributed
from util.cli import add_model_args, add_run_args, parse_args_or_exit, run_main, UserError
from util.logger import tensorboard_writer


def get_args_parser():
    parser = argparse.ArgumentParser('Test-time training with masked autoencoders')
    parser.add_argument('--data_path', required=True, help='folder of one test set, e.g. imagenet-c/fog/5')
    parser.add_argument('--batch_size', default=128, type=int, help='views of the image per step')
    parser.add_argument('--accum_iter', default=1, type=int, help='micro-batches per step')
    parser.add_argument('--steps_per_example', default=20, type=int, help='optimiser steps per image')
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--single_crop', action='store_true', help='every view is the eval crop')
    parser.add_argument('--finetune_mode', default='encoder', choices=FINETUNE_MODES)
    parser.add_argument('--optimizer_type', default='sgd', choices=['sgd', 'adam', 'adam_w'])
    parser.add_argument('--optimizer_momentum', default=0.9, type=float, help='SGD momentum')
    parser.add_argument('--weight_decay', default=0.01, type=float,
                        help="weight decay of adam_w (the released code used AdamW's default, 0.01)")
    parser.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * batch * accum / 256)')
    parser.add_argument('--blr', default=1e-2, type=float)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--parallel_images', default=1, type=int,
                        help='adapt this many images at once as independent weight sets (SGD only; '
                             'pays for small models on a GPU)')
    add_model_args(parser)
    add_test_time_args(parser)
    add_run_args(parser)
    return parser


def main(args):
    if args.steps_per_example < 0 or args.batch_size < 1 or args.accum_iter < 1:
        raise UserError("--steps_per_example must be >= 0, --batch_size and --accum_iter >= 1")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter / 256
    device, dataset, indices, model, store, todo = prepare_run(args)
    print(f"lr per image: {args.lr:.3g} (independent of the number of processes)")
    if todo is None:
        distributed.destroy()
        return
    trainer = (BatchedTestTimeTrainer if args.parallel_images > 1 else TestTimeTrainer)(model, args, device)
    test_set = TestTimeDataset(dataset.samples, todo, args.input_size, raw=not args.single_crop)
    loader = torch.utils.data.DataLoader(test_set, batch_size=None, num_workers=args.num_workers,
                                         pin_memory=device.type == 'cuda')
    log_writer = tensorboard_writer(args.log_dir)
    start = time.time()
    done = run_test_time_training(trainer, loader, store, args, log_writer)
    distributed.barrier()
    if distributed.is_main_process():
        result = write_outputs(args, store, dataset, indices, 'ttt', time.time() - start, done * args.world_size)
        if log_writer is not None:
            for step, acc in enumerate(result['accuracy_per_step']):
                log_writer.add_scalar('ttt/accuracy_per_step', acc, step)
            log_writer.close()
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, parse_args_or_exit(get_args_parser()))
