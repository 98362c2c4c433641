"""Accuracy of the combined model without test-time training: the baseline (docs/method.md)."""
import engine_run
from util.cli import (NEVER_USED, POSITIVE_INT, ArgumentParser, ReleasedFlag, add_data_args, add_model_args,
                      add_released_flags, add_run_args, add_test_time_args, run_main)


def get_args_parser():
    parser = ArgumentParser('Evaluation without adaptation', prog='test_without_adaptation.py')
    parser.add_argument('--batch_size', default=64, type=POSITIVE_INT,
                        help='images per forward pass, as the released baseline counts them (the predictions do not '
                             'depend on it; main_test_time_training.py counts views of one image)')
    add_model_args(parser, norm_pix_loss=False)
    add_test_time_args(parser)
    add_data_args(parser, 'folder of one test set, <data_path>/<class>/<image>, e.g. imagenet-c/fog/5')
    add_run_args(parser, seed=False, tensorboard=False)
    add_released_flags(
        parser, ReleasedFlag('--seed', type=int, default=0, no_effect='the baseline draws nothing at random'),
        ReleasedFlag('--norm_pix_loss', action='store_true', no_effect="the target of the reconstruction loss, which "
                                                                       "the baseline does not compute"),
        *(ReleasedFlag(flag, action='store_true', no_effect=NEVER_USED)
          for flag in ('--load_optimizer', '--load_loss_scalar', '--predict_rotations')))
    return parser


def main(args):
    engine_run.baseline(args)


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
