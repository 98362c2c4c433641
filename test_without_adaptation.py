"""Accuracy of the combined model without test-time training (SPEC section 6)."""
import argparse
import time

import torch

from engine_test_time import (AMP_DTYPES, TestTimeDataset, add_test_time_args, prepare_run, run_baseline,
                              write_outputs)
from util import distributed
from util.cli import add_model_args, add_run_args, parse_args_or_exit, run_main


def get_args_parser():
    parser = argparse.ArgumentParser('Evaluation without adaptation')
    parser.add_argument('--data_path', required=True, help='folder of one test set, e.g. imagenet-c/fog/5')
    parser.add_argument('--batch_size', default=64, type=int, help='images per forward pass')
    add_model_args(parser)
    add_test_time_args(parser)
    add_run_args(parser)
    return parser


def main(args):
    device, dataset, indices, model, store, todo = prepare_run(args)
    if todo is None:
        distributed.destroy()
        return
    loader = torch.utils.data.DataLoader(TestTimeDataset(dataset.samples, todo, args.input_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=device.type == 'cuda')
    start = time.time()
    done = run_baseline(model, loader, store, device, AMP_DTYPES[args.amp])
    distributed.barrier()
    if distributed.is_main_process():
        write_outputs(args, store, dataset, indices, 'baseline', time.time() - start, done * args.world_size)
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, parse_args_or_exit(get_args_parser()))
