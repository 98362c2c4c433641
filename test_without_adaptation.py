"""Accuracy of the combined model without test-time training (SPEC section 6)."""
import argparse
import os
import time

import torch

from engine_test_time import (TestTimeDataset, add_test_time_args, build_test_model, images_to_do,
                              load_test_set, run_baseline, run_config, set_precision, write_outputs)
from util import distributed
from util.cli import add_model_args, add_run_args, parse_args_or_exit, run_main
from util.results import ResultStore, check_run_config, select_indices


def get_args_parser():
    parser = argparse.ArgumentParser('Evaluation without adaptation')
    parser.add_argument('--data_path', required=True, help='folder of one test set, e.g. imagenet-c/fog/5')
    parser.add_argument('--batch_size', default=64, type=int, help='images per forward pass')
    parser.add_argument('--num_workers', default=4, type=int)
    add_model_args(parser)
    add_test_time_args(parser)
    add_run_args(parser)
    return parser


def main(args):
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    set_precision(device, args.strict_fp32)
    dataset = load_test_set(args)
    indices = select_indices(len(dataset), args.max_examples, args.subset, args.subset_seed)
    model = build_test_model(args, device)
    os.makedirs(args.output_dir, exist_ok=True)
    check_run_config(args.output_dir, run_config(args), distributed.is_main_process())
    store = ResultStore(args.output_dir, args.rank)
    distributed.barrier()
    todo = images_to_do(store, indices, args.rank, args.world_size)
    distributed.barrier()
    if todo is None:
        return
    loader = torch.utils.data.DataLoader(TestTimeDataset(dataset.samples, todo, args.input_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=device.type == 'cuda')
    amp_dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
    start = time.time()
    done, _ = run_baseline(model, loader, store, device, amp_dtype)
    distributed.barrier()
    if distributed.is_main_process():
        write_outputs(args, store, dataset, indices, 'baseline', time.time() - start, done * args.world_size)
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, parse_args_or_exit(get_args_parser()))
