"""Learning-rate schedule: linear warm-up, then half-cycle cosine to min_lr."""
import math


def lr_at(epoch, args):
    """lr at a fractional epoch (iteration / iterations_per_epoch + epoch)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1. + math.cos(math.pi * min(progress, 1.)))


def adjust_learning_rate(optimizer, epoch, args):
    """Set every param group's lr for this fractional epoch (honouring an optional lr_scale)."""
    lr = lr_at(epoch, args)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * param_group.get("lr_scale", 1.)
    return lr


def set_lr_from_blr(args):
    """--lr, or --blr scaled by the total batch over all processes and accumulation steps (MAE's rule)."""
    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}, "
          f"effective batch size: {eff_batch_size}")
