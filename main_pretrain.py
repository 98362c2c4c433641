"""MAE pre-training (docs/method.md)."""
import datetime
import os
import time

import torch

from engine_pretrain import train_one_epoch
from models_mae import HEAD_PREFIXES, build_model
from util import distributed
from util.checkpoint import checkpoint_path, resume_training, save_checkpoint
from util.cli import (OPEN_FRACTION, POSITIVE_INT, ArgumentParser, UserError, add_data_args, add_model_args,
                      add_run_args, add_training_args, run_main)
from util.datasets import ImageFolder, make_loader, train_transform
from util.logger import append_json_line, keep_log_before, tensorboard_writer
from util.lr_sched import set_lr_from_blr
from util.train_setup import start_training
from util.seed import derive_seed, seed_all
from timm.optim import param_groups_weight_decay


def get_args_parser():
    parser = ArgumentParser('MAE pre-training', prog='main_pretrain.py')
    add_training_args(parser, batch_size=64, epochs=400, warmup_epochs=40)
    parser.add_argument('--mask_ratio', default=0.75, type=OPEN_FRACTION, help='fraction of patches removed')
    parser.add_argument('--save_ckpt_freq', type=POSITIVE_INT, default=20, help='save a checkpoint every N epochs')
    add_model_args(parser, head=False)
    add_data_args(parser, 'dataset root: <data_path>/train/<class>/<image>',
                  min_crop_scale=0.2)  # MAE's pre-training recipe
    add_run_args(parser)
    return parser


def main(args):
    device = start_training(args)
    # no classification head: the checkpoint holds what the released MAE checkpoint holds
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, head_type=None)
    args.input_size = model.patch_embed.img_size[0]
    dataset_train = ImageFolder(os.path.join(args.data_path, 'train'),
                                transform=train_transform(args.input_size, args.min_crop_scale, args.hflip))
    print(f"{len(dataset_train)} training images in {len(dataset_train.classes)} classes")
    if len(dataset_train) < args.batch_size * args.world_size:
        raise UserError(f"{len(dataset_train)} training images is fewer than one batch "
                        f"({args.batch_size} x {args.world_size} processes)")
    data_loader_train = make_loader(dataset_train, args, train=True)

    model, model_without_ddp = distributed.wrap_model(model.to(device), args, device)
    set_lr_from_blr(args)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
    loss_scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    resume_training(args, model_without_ddp, optimizer, loss_scaler, drop=HEAD_PREFIXES)
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
    run_main(main, get_args_parser().parse_args())
