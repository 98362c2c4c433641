"""Accuracy of the combined model without test-time training: the baseline (docs/method.md)."""
import time

import torch

from engine_test_time import run_baseline
from models_mae import build_model
import models_vit  # noqa: F401 (registers MAE's fine-tuned ViTs: the paper's Fine-Tune row)
from util import distributed
from util.cli import POSITIVE_INT, ArgumentParser, add_data_args, add_model_args, add_run_args, add_test_time_args, \
    run_main
from util.datasets import TestTimeDataset, imagenet_subset
from util.results import ReadableOutputs, write_outputs
from util.run_setup import prepare_run


def get_args_parser():
    parser = ArgumentParser('Evaluation without adaptation', prog='test_without_adaptation.py')
    parser.add_argument('--batch_size', default=64, type=POSITIVE_INT,
                        help='images per forward pass (the predictions do not depend on it)')
    add_model_args(parser, norm_pix_loss=False)
    add_test_time_args(parser)
    add_data_args(parser, 'folder of one test set, <data_path>/<class>/<image>, e.g. imagenet-c/fog/5')
    add_run_args(parser, seed=False, tensorboard=False)
    return parser


def main(args):
    run = prepare_run(args, build_model)
    if run.todo is None:
        distributed.destroy()
        return
    loader = torch.utils.data.DataLoader(TestTimeDataset(run.dataset.samples, run.todo, args.input_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and run.device.type == 'cuda')
    start = time.time()
    with ReadableOutputs(args, run, 'baseline', distributed.is_main_process()) as outputs:
        done = run_baseline(run.model, loader, run.store, outputs, run.device, args,
                            imagenet_subset(args.dataset_name))
    distributed.barrier()
    if distributed.is_main_process():
        write_outputs(args, run, 'baseline', time.time() - start, done * args.world_size)
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
