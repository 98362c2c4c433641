"""MAE pre-training (SPEC section 3)."""
import argparse
import datetime
import os
import time

import torch

from engine_pretrain import train_one_epoch
from models_mae import build_model
from util import distributed
from util.checkpoint import HEAD_PREFIXES, checkpoint_path, resume_training, save_checkpoint
from util.cli import (add_data_args, add_model_args, add_run_args, add_training_args, parse_args_or_exit, run_main,
                      UserError)
from util.datasets import ImageFolder, make_loader, train_transform
from util.logger import append_json_line, keep_log_before, tensorboard_writer
from util.lr_sched import set_lr_from_blr
from util.seed import derive_seed, seed_all
from timm.optim import param_groups_weight_decay


def get_args_parser():
    parser = argparse.ArgumentParser('MAE pre-training', add_help=True)
    add_training_args(parser, batch_size=64, epochs=400, warmup_epochs=40)
    parser.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches removed')
    parser.add_argument('--save_ckpt_freq', type=int, default=20, help='save a checkpoint every N epochs')
    add_model_args(parser)
    add_data_args(parser, min_crop_scale=0.2)  # MAE's pre-training recipe
    add_run_args(parser)
    return parser


def main(args):
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    seed_all(derive_seed(args.seed, args.rank))  # the initial weights follow --seed
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes)
    args.input_size = model.patch_embed.img_size[0]
    dataset_train = ImageFolder(os.path.join(args.data_path, 'train'),
                                transform=train_transform(args.input_size, args.min_crop_scale, args.hflip))
    print(f"{len(dataset_train)} training images in {len(dataset_train.classes)} classes")
    if len(dataset_train) < args.batch_size * args.world_size:
        raise UserError(f"{len(dataset_train)} training images is fewer than one batch "
                        f"({args.batch_size} x {args.world_size} processes)")
    data_loader_train = make_loader(dataset_train, args, train=True)

    # the classification head is not part of pre-training; freeze it before DDP records what trains
    for name, p in model.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            p.requires_grad = False
    model, model_without_ddp = distributed.wrap_model(model.to(device), args, device)
    set_lr_from_blr(args)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
    loss_scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    resume_training(args, model_without_ddp, optimizer, loss_scaler)
    log_path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else None
    keep_log_before(log_path, args.start_epoch)  # epochs after the checkpoint are redone
    log_writer = tensorboard_writer(args.log_dir)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        # per-epoch seeds: a resumed run draws exactly the crops and masks of an uninterrupted one
        seed_all(derive_seed(args.seed, epoch, args.rank))
        data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      log_writer=log_writer, args=args)
        if args.output_dir and distributed.is_main_process():
            # the log line before the checkpoint: a rerun drops lines past its checkpoint (see above)
            append_json_line(log_path, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
            # 'final' first: a run killed between the two saves resumes from the epoch before and
            # redoes this one, rather than resuming past the end with no checkpoint-final.pth
            if epoch + 1 == args.epochs:
                save_checkpoint(checkpoint_path(args.output_dir, 'final'), model_without_ddp, optimizer,
                                epoch, loss_scaler, args)
            if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
                save_checkpoint(checkpoint_path(args.output_dir, epoch), model_without_ddp, optimizer,
                                epoch, loss_scaler, args)
        if log_writer is not None:
            log_writer.flush()
        distributed.barrier()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, parse_args_or_exit(get_args_parser()))
