"""Online TTT-MAE over a stream of test images (docs/online.md): the weights carry over from one image to the
next instead of being reset, and each step's views come from a window of the latest images. The defaults
are the follow-up work's recipe for streams (Test-Time Training on Video Streams, Wang, Sun, et al., 2023):
1 AdamW step per image at lr 1e-4 with the encoder at 0.1x, weight decay 0.05, gradient clipping at 1,
a window of 16 images, the decoder adapting too, a fresh optimiser state per image.

Each process runs its own stream over a contiguous share of the images: the number of processes is part
of the run's settings. The state is saved with the results, so a killed run continues exactly.
"""
import engine_run
from engine_online import Online
from util.cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, ArgumentParser,
                      add_adaptation_args, add_data_args, add_model_args, add_run_args, add_test_time_args,
                      check_stop_rule, number, run_main)


def get_args_parser():
    parser = ArgumentParser('Online test-time training with masked autoencoders', prog='main_online_ttt.py')
    add_adaptation_args(parser, steps=1, finetune_mode='all', optimizer_type='adam_w', weight_decay=0.05, lr=1e-4)
    group = parser.add_argument_group('online')
    group.add_argument('--encoder_lr_scale', default=0.1, type=POSITIVE_FLOAT,
                       help="the encoder's weights step at this times the lr; the decoder and mask_token at the lr")
    group.add_argument('--clip_grad', default=1., type=NON_NEGATIVE_FLOAT,
                       help="clip the gradient of all adapted weights to this L2 norm before each step (0: no clipping)")
    group.add_argument('--online_window', default=16, type=POSITIVE_INT,
                       help="each step's views are spread over the last K images (the current one and the K-1 before "
                            "it); 1 = plain online TTT-MAE")
    group.add_argument('--stream_order', default='shuffled', choices=['shuffled', 'listed', 'natural'],
                       help="the stream is the images shuffled with --seed (a class-sorted folder is a label-correlated "
                            "stream), in the order listed (the folder's, or --subset_file's), or by file name with "
                            "numbers as numbers (video frames: frame_2 before frame_10)")
    group.add_argument('--online_keep_optimizer', action='store_true',
                       help='carry the optimiser state from image to image too (default: a fresh one for every image, '
                            "as the follow-up work's --restart_optimizer)")
    group.add_argument('--online_reset_every', default=0, type=NON_NEGATIVE_INT,
                       help='back to the loaded weights every N images of the stream (0: never)')
    group.add_argument('--online_anchor', default=0., type=NON_NEGATIVE_FLOAT,
                       help='add anchor/2 * ||w - w0||^2 (w0 the loaded weights) to the loss, a pull toward them')
    group.add_argument('--online_restore', default=0., type=number(float, 0, 1),
                       help='after every step, each adapted weight goes back to its loaded value with this '
                            'probability (stochastic restore)')
    group.add_argument('--online_ema', default=0., type=number(float, 0, 1, high_open=True),
                       help='classify with an exponential moving average of the adapted weights, updated after every '
                            'step with this momentum (0: the adapted weights themselves)')
    add_model_args(parser)
    add_test_time_args(parser)
    add_data_args(parser, 'folder of the stream, <data_path>/<class>/<image>; --subset_file and --stream_order listed '
                          'for an order of your own')
    add_run_args(parser)
    return parser


def main(args):
    check_stop_rule(args)
    engine_run.test_time_training(args, Online())


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
