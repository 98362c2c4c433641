"""Command-line plumbing shared by the entry scripts: argument groups and clean user errors."""
import sys

import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def run_main(main, args):
    try:
        return main(args)
    except UserError as e:
        message = str(e).strip()
        if 'Original Traceback' in message:  # raised in a DataLoader worker: keep its last line
            message = message.splitlines()[-1].split('UserError: ', 1)[-1]
        sys.stderr.write(f"error: {message}\n")  # on every rank: only one may have hit it
        sys.exit(2)


def add_model_args(parser, default_model='mae_vit_large_patch16'):
    group = parser.add_argument_group('model')
    group.add_argument('--model', default=default_model, type=str, metavar='MODEL',
                       help='name of the model builder (see models_mae.MODELS)')
    group.add_argument('--input_size', default=None, type=int,
                       help="image size (default: the model's own, 224 for the ViTs)")
    group.add_argument('--norm_pix_loss', action='store_true',
                       help='reconstruct per-patch normalised pixels')
    group.add_argument('--head_type', default='vit_head', choices=['vit_head', 'linear'])
    group.add_argument('--classifier_depth', default=None, type=int,
                       help="blocks in the ViT head (default: the model's, 12 for base/large/huge)")
    group.add_argument('--num_classes', '--nb_classes', dest='num_classes', default=1000, type=int)
    return group


def add_training_args(parser, batch_size, epochs, warmup_epochs):
    """Optimisation and schedule flags shared by pre-training and probing (MAE's names and meanings)."""
    group = parser.add_argument_group('training')
    group.add_argument('--batch_size', default=batch_size, type=int, help='batch size per GPU')
    group.add_argument('--epochs', default=epochs, type=int)
    group.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps')
    group.add_argument('--weight_decay', type=float, default=0.05)
    group.add_argument('--lr', type=float, default=None, help='absolute lr (default: blr * eff. batch / 256)')
    group.add_argument('--blr', type=float, default=1e-3, help='base lr: lr = blr * total batch size / 256')
    group.add_argument('--min_lr', type=float, default=0., help='lower lr bound of the cosine schedule')
    group.add_argument('--warmup_epochs', type=int, default=warmup_epochs)
    group.add_argument('--resume', default='', help='checkpoint to resume (default: newest in output_dir)')
    group.add_argument('--start_epoch', default=0, type=int)
    group.add_argument('--print_freq', default=20, type=int)


def add_data_args(parser, min_crop_scale=None):
    """Data flags; with min_crop_scale, also the training augmentation's (default: that scale + flips)."""
    group = parser.add_argument_group('data')
    group.add_argument('--data_path', required=True, type=str, help='dataset root')
    if min_crop_scale is not None:
        group.add_argument('--min_crop_scale', default=min_crop_scale, type=float,
                           help='smallest area fraction of a RandomResizedCrop (default: %(default)s)')
        group.add_argument('--no_hflip', action='store_false', dest='hflip',
                           help='no random horizontal flips (e.g. for digits or text)')
    group.add_argument('--num_workers', default=10, type=int)
    group.add_argument('--pin_mem', action='store_true', default=True,
                       help='pin CPU memory in the DataLoader for faster transfer to the GPU')
    group.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    return group


def add_run_args(parser):
    """Output, device, seed and the distributed flags every launcher may pass."""
    group = parser.add_argument_group('run')
    group.add_argument('--output_dir', default='./output_dir', help='where to save results, empty for no saving')
    group.add_argument('--log_dir', default=None, help='TensorBoard folder (default: --output_dir)')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='device to use (default: cuda when available, else cpu)')
    group.add_argument('--seed', default=0, type=int)
    group.add_argument('--world_size', default=1, type=int, help='set by the launcher; kept for old scripts')
    # torch.distributed.launch passes --local-rank (new) or --local_rank (old); torchrun passes env vars
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', default=-1, type=int)
    group.add_argument('--dist_url', default='env://',
                       help='used only when the launcher did not set MASTER_ADDR/MASTER_PORT')
    return group


def parse_args_or_exit(parser, argv=None):
    args = parser.parse_args(argv)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return args
