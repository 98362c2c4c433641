"""Test-time training with masked autoencoders on one folder of test images (docs/method.md).

Each process adapts a disjoint share of the images (the released loop did not split them: every
process adapted every image); the per-image learning rate is blr * batch_size * accum_iter / 256
whatever the number of processes, since every image is still adapted alone (the released code also
multiplied by the world size, which on one GPU is 1). Online TTT-MAE has its own script, main_online_ttt.py.
"""
import argparse

import engine_run
from util.cli import (DIST_ON_ITP, POSITIVE_INT, ArgumentParser, ReleasedFlag, UserError, add_adaptation_args,
                      add_data_args, add_model_args, add_released_flags, add_run_args, add_test_time_args,
                      check_stop_rule, run_main)


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
    add_released_flags(
        parser, DIST_ON_ITP,
        ReleasedFlag('--load_loss_scalar', action='store_true',
                     no_effect="it loaded the MAE checkpoint's AMP loss scale; the released loop ran in fp32, where "
                               "scaling the loss and unscaling the gradients changes nothing but rounding"),
        ReleasedFlag('--stored_latents', default='', refused="with it the released loop skipped the per-image reset of "
                     "the weights and built no optimiser (a leftover of another experiment, not TTT-MAE); not reproduced"))
    return parser


def resolve_lr(args, given):
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


def main(args):
    check_args(args)
    engine_run.test_time_training(args)


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
