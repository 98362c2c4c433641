"""The start that pre-training and probing share: output folder, processes, the settings in the log, the seed."""
import torch

from util import distributed
from util.cli import make_output_dir
from util.seed import derive_seed, seed_all


def start_training(args):
    """Output folder, processes, the run's settings printed (as MAE's scripts do: with every --plugin's file and
    SHA-256, which the checkpoints' args hold too) and the seed of the initial weights (from --seed); returns
    the device."""
    if args.output_dir:
        make_output_dir(args.output_dir)
    distributed.init_distributed_mode(args)
    print(f"settings: {vars(args)}")
    torch.backends.cudnn.benchmark = True
    seed_all(derive_seed(args.seed, args.rank))
    return torch.device(args.device)
