"""MAE pre-training (docs/method.md)."""
import datetime
import os
import time

import torch

from engine_pretrain import train_one_epoch
from models_mae import build_model
from util import distributed
from util.checkpoint import checkpoint_path, prune_checkpoints, resume_training, save_checkpoint
from util.compat import pretraining_weights
from util.cli import (DIST_ON_ITP, NEVER_USED, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE_INT,
                      ArgumentParser, ReleasedFlag, UserError, add_data_args, add_model_args, add_released_flags,
                      add_run_args, add_training_args, run_main)
from util.datasets import ImageFolder, make_loader, train_transform, training_classes
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
    parser.add_argument('--joint_weight', default=0., type=NON_NEGATIVE_FLOAT,
                        help="joint training (the paper's Joint Train row): add this times the cross-entropy of a "
                             "ViT head on the unmasked images to the MAE loss (0: MAE alone; the released history "
                             "used 0.01)")
    parser.add_argument('--classifier_depth', default=None, type=POSITIVE_INT,
                        help="blocks of the jointly trained ViT head (None: the model's); without --joint_weight "
                             "pre-training builds no head and it has no effect")
    parser.add_argument('--keep_last', default=0, type=NON_NEGATIVE_INT,
                        help="keep the newest N numbered checkpoints besides checkpoint-final.pth (0: every one, as "
                             "released; an 800-epoch run saving every 100 keeps eight)")
    add_model_args(parser, head=False)
    add_data_args(parser, 'dataset root: <data_path>/train/<class>/<image>',
                  min_crop_scale=0.2)  # MAE's pre-training recipe
    add_run_args(parser)
    add_released_flags(parser, DIST_ON_ITP, ReleasedFlag('--break_after_epoch', type=int, default=None,
                                                         no_effect=NEVER_USED))
    return parser


def main(args):
    if args.classifier_depth is not None and not args.joint_weight:  # the released command may pass it
        print("note: --classifier_depth has no effect without --joint_weight: pre-training builds no head")
        args.classifier_depth = None
    device = start_training(args)
    train_dir = os.path.join(args.data_path, 'train')
    # MAE alone: no head, the checkpoint holds what the released MAE checkpoint holds; jointly: a ViT head too,
    # whose class names the checkpoint records, as a probe's
    classes = training_classes(train_dir) if args.joint_weight else None
    head = dict(head_type='vit_head', classifier_depth=args.classifier_depth, num_classes=len(classes)) if classes \
        else dict(head_type=None)
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, **head)
    args.input_size = model.parts().image_size
    # labelled as the head's classes (ImageFolder's default)
    dataset_train = ImageFolder(train_dir, transform=train_transform(args.input_size, args.min_crop_scale, args.hflip))
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
    resume_training(args, model_without_ddp, optimizer, loss_scaler, older=pretraining_weights)
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
                                      log_writer=log_writer, args=args,
                                      compute_loss=joint_loss(model, args) if args.joint_weight else None)
        if args.output_dir and distributed.is_main_process():
            # the log line before the checkpoint: a rerun drops lines past its checkpoint (see above)
            append_json_line(log_path, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
            # 'final' first: a run killed between the two saves resumes from the epoch before and
            # redoes this one, rather than resuming past the end with no checkpoint-final.pth
            if epoch + 1 == args.epochs:
                save_checkpoint(checkpoint_path(args.output_dir, 'final'), model_without_ddp, optimizer,
                                epoch, loss_scaler, args, classes=classes)
            if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
                save_checkpoint(checkpoint_path(args.output_dir, epoch), model_without_ddp, optimizer,
                                epoch, loss_scaler, args, classes=classes)
                if args.keep_last:  # after the new one is written: a kill leaves at least what was there
                    prune_checkpoints(args.output_dir, args.keep_last)
        if log_writer is not None:
            log_writer.flush()
        distributed.barrier()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    distributed.destroy()


def joint_loss(model, args):
    """MAE loss + joint_weight x the ViT head's cross-entropy, as the released history's joint training
    (`0.01 * loss_dict["classification"] + loss_dict["mae"]`). The ViT head reads every token, so it
    classifies the unmasked images in a second pass of the encoder. Both through forward, whose outputs
    are picked here: DistributedDataParallel synchronises gradients only in a call of forward."""
    def loss(samples, targets):
        mae = model(samples, mask_ratio=args.mask_ratio)[0]['mae']
        return mae + args.joint_weight * model(samples, target=targets, mask_ratio=0)[0]['classification']
    return loss


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
