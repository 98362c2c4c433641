"""Command-line plumbing of the entry scripts: the parser, the argument groups they share, checked
numbers, and bad input reported as one line with exit status 2. (torch is imported where a device is
asked about, so that the scripts that only read results start quickly.)"""
import argparse
import math
import os
import sys

from util.errors import UserError  # the scripts import it from here, with the CLI's other helpers

OPTIMIZERS = ('sgd', 'adam', 'adam_w')  # engine_test_time.build_optimizer
TEST_SET_NAMES = ('imagenet_c', 'imagenet', 'imagenet_r', 'imagenet_a', 'imagenet_v2', 'imagenet_sketch', 'folder')


class ReleasedFlag:
    """A flag of the released script, taken so that its commands and shell scripts run: with its released effect
    (what it does here, `does`), or with none here (`no_effect`: printed as one line when given, and the flag
    left out of the run's settings), or refused (`refused`: why, one line, exit 2)."""

    def __init__(self, flag, does=None, no_effect=None, refused=None, **kwargs):
        self.flag, self.does, self.no_effect, self.refused, self.kwargs = flag, does, no_effect, refused, kwargs


def add_released_flags(parser, *flags):
    """A --help group of the released script's other flags (util/cli.ReleasedFlag each)."""
    group = parser.add_argument_group('released flags', "the released script's other flags, accepted so that its "
                                                         "commands run; each says what it does here")
    dests = {}
    for f in flags:
        text = f.does or (f"no effect here: {f.no_effect}" if f.no_effect else f"refused: {f.refused}")
        dests[group.add_argument(f.flag, help=text, **f.kwargs).dest] = f

    def resolve(args, given):
        for dest, f in dests.items():
            if dest in given and f.refused:
                raise UserError(f"{f.flag}: {f.refused}")
            if dest in given and f.no_effect:
                print(f"note: {f.flag} has no effect here: {f.no_effect}")
            if f.no_effect or f.refused:
                delattr(args, dest)  # nothing it changes: not among the run's settings
    parser.resolvers.append(resolve)
    return group


NEVER_USED = 'the released script parsed it and never used it'
DIST_ON_ITP = ReleasedFlag('--dist_on_itp', action='store_true',
                           does="as released: the processes' ranks from OpenMPI (OMPI_COMM_WORLD_RANK, _SIZE and "
                                "_LOCAL_RANK, with MASTER_ADDR and MASTER_PORT), for mpirun launches")


def run_main(main, args):
    from util.distributed import report_failure
    try:
        return main(args)
    except UserError as e:
        message = str(e).strip()
        if 'Original Traceback' in message:  # raised in a DataLoader worker: keep its last line
            message = message.splitlines()[-1].split('UserError: ', 1)[-1]
        sys.stderr.write(f"error: {message}\n")  # on every rank: only one may have hit it
        report_failure(message)  # the other processes stop now, not at a collective's timeout
        sys.exit(2)
    except Exception as e:
        report_failure(f"{type(e).__name__}: {e}")
        raise


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help; the description keeps its line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad number, unknown choice, flags that contradict each other, a
    plugin that cannot be imported) are one 'error:' line, exit 2. Every script takes --plugin, imported
    before the other flags are read, so that the names it registers are valid values. resolvers run in
    turn once the flags are parsed, resolve(args, given) with `given` the flags the command line set: each
    fills in defaults that depend on other flags, or raises UserError for a combination that cannot run."""

    def __init__(self, description=None, resolve=None, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)
        self.resolvers = [resolve] if resolve else []
        self.beyond = self.add_argument_group('beyond the paper', 'code of your own and other methods on the same '
                                                                  'model (docs/method.md, "Extending")')
        self.beyond.add_argument('--plugin', action='append', default=None, metavar='PATH_OR_MODULE',
                                 help="a .py file or module of your own, imported before anything is built: the "
                                      "models, objectives and --finetune_mode rules it registers take their names "
                                      "(repeatable; recorded with its SHA-256)")

    def format_help(self):
        self._action_groups.remove(self.beyond)  # shown last, after the paper's flags
        self._action_groups.append(self.beyond)
        return super().format_help()

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        from util.plugins import load_plugin
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument('--plugin', action='append', default=[])
        try:
            plugins = [load_plugin(spec) for spec in early.parse_known_args(argv)[0].plugin]
        except UserError as e:
            self.error(str(e))
        args = super().parse_args(argv, namespace)
        args.plugin_files = plugins or None
        if getattr(args, 'log_dir', '') is None:
            args.log_dir = args.output_dir
        given = self.given(argv)
        try:
            for resolve in self.resolvers:
                resolve(args, given)
        except UserError as e:
            self.error(str(e))
        return args

    def given(self, argv):
        """The destinations the command line sets (a second parse, with no defaults)."""
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            return set(vars(super().parse_known_args(argv)[0]))
        finally:
            for action, default in defaults:
                action.default = default


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends on request).

    Checked while parsing, so an out-of-range value stops the script before any work is done."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def finetune_rule(text):
    """An argparse type: a rule for which parameters adapt, NAME or NAME:PARAM (util/finetune_modes.py)."""
    from util.finetune_modes import parse_finetune_mode
    try:
        parse_finetune_mode(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def objective_name(text):
    """An argparse type: a registered objective (util/objectives.py)."""
    from util.objectives import OBJECTIVES
    if text not in OBJECTIVES:
        raise argparse.ArgumentTypeError(f"unknown objective {text!r}; choices: {', '.join(OBJECTIVES)}")
    return text


class LossWeight(argparse.Action):
    """--loss_weight NAME=W, repeatable: {name: weight} of the objective's losses."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, equals, value = values.partition('=')
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not (name and equals and weight is not None and math.isfinite(weight) and weight >= 0):
            parser.error(f"--loss_weight takes NAME=W with W a number >= 0, got {values!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), name: weight})


def flag_text(dest, value):
    """A flag and its value as a command line gives them."""
    if isinstance(value, bool):
        return f"--{dest}" if value else f"--no_{dest}"
    return f"--{dest} {value:g}" if isinstance(value, float) else f"--{dest} {value}"


def apply_objective_recipe(args, given):
    """--objective's own defaults (util/objectives.py), for the flags the command line does not set; an lr set
    by --blr counts as set."""
    from util.objectives import OBJECTIVES
    recipe = {k: v for k, v in OBJECTIVES[args.objective].recipe.items()
              if hasattr(args, k) and k not in given and not (k == 'lr' and 'blr' in given)}
    for k, v in recipe.items():
        setattr(args, k, v)


def stop_rule(text):
    """An argparse type: a stopping rule NAME:PARAM (util/stop_rules.py), checked while parsing."""
    from util.stop_rules import parse
    try:
        return parse(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Switch(argparse.Action):
    """A flag and its negation as one entry of --help: --x sets True, --no_x sets False."""

    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith('--no_'))


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = number(float, 0)
OPEN_FRACTION = number(float, 0, 1, low_open=True, high_open=True)


def device(text):
    """An argparse type: cpu, cuda or cuda:N (whether this machine has a GPU is checked when the run
    starts, so that a command still parses on another machine)."""
    import torch
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: cpu or cuda")
    if parsed.type == 'cuda' and parsed.index is not None and torch.cuda.is_available() \
            and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def make_output_dir(path):
    """Create --output_dir (and parents); a file in the way or a folder that cannot be made is a UserError."""
    if not path:
        raise UserError("--output_dir is empty: results are written there")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output_dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into --output_dir {path}: permission denied")


# ---- argument groups ----

def add_model_args(parser, head=True, norm_pix_loss=True, norm_pix_help=None):
    """The model's name and sizes; with head, the classification head's flags."""
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='mae_vit_large_patch16', metavar='MODEL',
                       help='model builder by name (see models_mae.MODELS)')
    group.add_argument('--input_size', default=None, type=POSITIVE_INT,
                       help="image side in pixels (None: the model's own, 224 for the ViTs)")
    if norm_pix_loss:
        group.add_argument('--norm_pix_loss', action='store_true',
                           help=norm_pix_help or 'reconstruct per-patch normalised pixels (keep the same in '
                                'pre-training and test-time training)')
    if head:
        group.add_argument('--head_type', default='vit_head', metavar='{vit_head,linear}',
                           help="classification head: a ViT on all tokens (the paper) or BatchNorm + Linear on the "
                                "cls token (a plugin's model may take others)")
        group.add_argument('--classifier_depth', default=None, type=POSITIVE_INT,
                           help="blocks in the ViT head (None: the model's, 12 for base/large/huge)")
        group.add_argument('--num_classes', '--nb_classes', dest='num_classes', default=1000, type=POSITIVE_INT,
                           help='outputs of the head')
    return group


def add_training_args(parser, batch_size, epochs, warmup_epochs, weight_decay=0.05, min_lr=0.,
                      weight_decay_help='AdamW weight decay (not on biases and 1-D weights)'):
    """Optimisation and schedule flags shared by pre-training and probing (MAE's names and meanings);
    the defaults are each script's released ones."""
    group = parser.add_argument_group('training')
    group.add_argument('--batch_size', default=batch_size, type=POSITIVE_INT,
                       help='images per process and iteration (in the test-time scripts the same flag counts views of '
                            'one image, or images per forward pass)')
    group.add_argument('--epochs', default=epochs, type=POSITIVE_INT, help='epochs to train')
    group.add_argument('--accum_iter', default=1, type=POSITIVE_INT, help='iterations accumulated per optimiser step')
    group.add_argument('--weight_decay', type=NON_NEGATIVE_FLOAT, default=weight_decay, help=weight_decay_help)
    group.add_argument('--lr', type=POSITIVE_FLOAT, default=None,
                       help='absolute peak lr (None: blr * batch_size * accum_iter * processes / 256)')
    group.add_argument('--blr', type=POSITIVE_FLOAT, default=1e-3, help='base lr, scaled by the total batch / 256')
    group.add_argument('--min_lr', type=NON_NEGATIVE_FLOAT, default=min_lr, help='lr at the end of the cosine schedule')
    group.add_argument('--warmup_epochs', type=NON_NEGATIVE_INT, default=warmup_epochs,
                       help='epochs of linear lr warm-up')
    group.add_argument('--resume', default='', help='checkpoint to resume (empty: the newest in --output_dir)')
    group.add_argument('--start_epoch', default=0, type=NON_NEGATIVE_INT,
                       help='first epoch (set from the checkpoint when resuming)')
    return group


def add_data_args(parser, data_help, min_crop_scale=None):
    """Where the images are and how they are loaded; with min_crop_scale, the training augmentation."""
    group = parser.add_argument_group('data')
    group.add_argument('--data_path', required=True, help=data_help)
    if min_crop_scale is not None:
        group.add_argument('--min_crop_scale', default=min_crop_scale, type=number(float, 0, 1, low_open=True),
                           help='smallest area fraction of a training RandomResizedCrop')
        group.add_argument('--no_hflip', action='store_false', dest='hflip',
                           help='no random horizontal flips in training (e.g. for digits or text)')
    group.add_argument('--num_workers', default=10, type=NON_NEGATIVE_INT,
                       help='image decoding processes (0: decode in the main process)')
    group.add_argument('--pin_mem', '--no_pin_mem', action=Switch, default=True,
                       help='pin host memory of loaded batches for faster copies to the GPU (or not)')
    return group


def add_test_time_args(parser):
    """What both test-time scripts (TTT and the baseline) evaluate: checkpoints, images, precision."""
    group = parser.add_argument_group('test time')
    group.add_argument('--resume_model', default=None,
                       help='MAE checkpoint with the decoder (e.g. mae_pretrain_vit_large_full.pth); none for a '
                            'fine-tuned ViT (--model vit_large_patch16)')
    group.add_argument('--resume_finetune', required=True,
                       help='probe checkpoint with the classification head (written by main_prob.py), or a fine-tuned '
                            "ViT's (e.g. MAE's mae_finetuned_vit_large.pth with --model vit_large_patch16)")
    group.add_argument('--dataset_name', default='imagenet_c', choices=TEST_SET_NAMES,
                       help='what --data_path holds: imagenet_c, imagenet, imagenet_sketch: ImageNet wnid folders; '
                            'imagenet_r, imagenet_a: wnid folders of their 200 classes, predictions restricted to '
                            'them; imagenet_v2: folders named by class index 0..999; folder: folders named as the '
                            "head's classes (a dataset of one's own)")
    group.add_argument('--classes', default=None,
                       help="file of the head's class names in label order, one per line (default: the probe "
                            "checkpoint's record, or the ImageNet-1k wnids for a 1000-class head without one)")
    group.add_argument('--max_examples', default=None, type=POSITIVE_INT,
                       help='evaluate only this many images of the folder (None: all)')
    group.add_argument('--subset', default='stride', choices=['stride', 'random', 'first'],
                       help='which --max_examples images: evenly spaced, random (--subset_seed) or the first')
    group.add_argument('--subset_seed', default=0, type=NON_NEGATIVE_INT, help='seed of --subset random')
    group.add_argument('--subset_file', default=None,
                       help="evaluate exactly the images this file lists, one path relative to --data_path per line "
                            "(e.g. RobustBench's 5,000-image ImageNet-C list, docs/datasets.md)")
    group.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'],
                       help='autocast precision; none = fp32 (on CUDA with TF32 matmuls, as the released '
                            'code ran)')
    group.add_argument('--strict_fp32', action='store_true', help='on CUDA, full fp32 matmuls instead of TF32')
    return group


def add_run_args(parser, seed=True, tensorboard=True):
    """Outputs, device, progress lines and the flags every launcher may pass."""
    group = parser.add_argument_group('run')
    group.add_argument('--output_dir', default='./output_dir', help='where results and checkpoints are written')
    if tensorboard:
        group.add_argument('--log_dir', default=None, help='TensorBoard folder (None: --output_dir)')
    group.add_argument('--device', default='cuda', type=device,
                       help='cuda (as the released scripts) or cpu; with several processes each takes the GPU '
                            'of its local rank')
    if seed:
        group.add_argument('--seed', default=0, type=NON_NEGATIVE_INT,
                           help='seed of initial weights, data order, crops and masks')
    group.add_argument('--print_freq', default=20, type=POSITIVE_INT,
                       help='a progress line every N iterations (test-time training: every N images)')
    group.add_argument('--world_size', default=None, type=POSITIVE_INT,
                       help='number of processes; the launcher decides it, this only checks it agrees')
    # torch.distributed.launch passes --local-rank (new) or --local_rank (old); torchrun passes env vars
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', default=-1, type=int,
                       help='set by torch.distributed.launch')
    group.add_argument('--dist_url', default='env://',
                       help='rendezvous when the launcher sets no MASTER_ADDR/MASTER_PORT, e.g. '
                            'file:///shared/folder/init_file')
    return group


def add_adaptation_args(parser, steps, finetune_mode, optimizer_type, weight_decay, lr):
    """How each image is adapted, shared by the paper's script and the online one, each with its own
    defaults (lr None: --lr is computed from --blr, as the released code did)."""
    group = parser.add_argument_group('test-time training')
    group.add_argument('--batch_size', default=128, type=POSITIVE_INT,
                       help='views of the one image per step, as the released test-time script counts them (not '
                            'images: each image is adapted alone)')
    group.add_argument('--accum_iter', default=1, type=POSITIVE_INT, help='micro-batches of views per step')
    group.add_argument('--steps_per_example', default=steps, type=NON_NEGATIVE_INT, help='optimiser steps per image')
    group.add_argument('--mask_ratio', default=0.75, type=OPEN_FRACTION, help='fraction of patches removed')
    group.add_argument('--single_crop', '--no_single_crop', action=Switch,
                       help='every view is the eval crop (the paper), or (--no_single_crop, the released flag) '
                            'random resized crops + flips')
    group.add_argument('--finetune_mode', default=finetune_mode, type=finetune_rule, metavar='RULE',
                       help='what adapts: encoder = everything but the decoder (the paper); all = the decoder '
                            'too; encoder_no_cls_no_msk = the encoder without cls_token and mask_token; norm, bias, '
                            "last:K, lora:R[:ALPHA] (docs/method.md) or a plugin's rule")
    group.add_argument('--optimizer_type', default=optimizer_type, choices=OPTIMIZERS,
                       help='sgd (momentum --optimizer_momentum, no weight decay), adam or adam_w (betas 0.9, 0.95)')
    group.add_argument('--optimizer_momentum', default=0.9, type=number(float, 0, 1, high_open=True),
                       help='SGD momentum')
    group.add_argument('--weight_decay', default=weight_decay, type=NON_NEGATIVE_FLOAT, help='weight decay of adam_w')
    if lr is None:
        group.add_argument('--lr', default=None, type=POSITIVE_FLOAT,
                           help='absolute lr (None: blr * batch_size * accum_iter / 256)')
        group.add_argument('--blr', default=1e-2, type=POSITIVE_FLOAT, help='base lr, scaled by the views per step / 256')
    else:
        group.add_argument('--lr', default=lr, type=POSITIVE_FLOAT, help='learning rate')
    group.add_argument('--stop_rule', default=None, type=stop_rule, metavar='NAME:PARAM',
                       help="stop adapting an image once a label-free rule fires (fixed:K, stable:M, plateau:X, "
                            "confident:P; util/stop_rules.py); the per-step records keep their width. None: "
                            "--steps_per_example steps for every image (the paper)")
    group.add_argument('--flush_every', default=10, type=POSITIVE_INT, help='save results every N images')
    from util.objectives import OBJECTIVES
    recipes = '; '.join(f"{name}: {' '.join(flag_text(k, v) for k, v in cls.recipe.items())}"
                        for name, cls in OBJECTIVES.items() if cls.recipe)
    parser.beyond.add_argument('--objective', default='mae', type=objective_name, metavar='NAME',
                               help="what each step minimises (util/objectives.py): mae = the model's test-time losses "
                                    "(TTT-MAE), entropy = the entropy of each view's prediction (TENT's loss), memo = the "
                                    "entropy of the prediction averaged over augmented views (MEMO), or a plugin's. "
                                    f"Each sets its own recipe where the command line does not: {recipes}")
    parser.beyond.add_argument('--loss_weight', action=LossWeight, default=None, metavar='NAME=W',
                               help="the weight of the objective's loss NAME in the sum a step minimises (repeatable; "
                                    "default: the model's declared weights, 1 where none)")
    parser.resolvers.insert(0, apply_objective_recipe)
    group.add_argument('--verbose', action='store_true',
                       help="print every step's losses of each image once it is done (the released lines)")
    group.add_argument('--save_reconstructions', default=0, type=NON_NEGATIVE_INT,
                       help='for the first N images, a PNG of the masked input and the reconstruction as TTT proceeds '
                            '(OUT/reconstructions/)')
    return group


def check_stop_rule(args):
    """--stop_rule against --steps_per_example, before any work (both test-time scripts)."""
    if args.stop_rule and args.stop_rule[0] == 'fixed' and args.stop_rule[1] > args.steps_per_example:
        raise UserError(f"--stop_rule fixed:{args.stop_rule[1]} stops after more steps than --steps_per_example "
                        f"{args.steps_per_example}")
