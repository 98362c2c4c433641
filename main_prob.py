"""Train the classification head (ViT head or linear) on frozen MAE features: probing (docs/method.md)."""
import datetime
import os
import time

import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import param_groups_weight_decay

from engine_prob import evaluate, train_one_epoch
from models_mae import build_model
from util import distributed
from util.checkpoint import checkpoint_path, load_finetune_for_probe, prune_checkpoints, resume_training, save_checkpoint
from util.cli import (DIST_ON_ITP, NON_NEGATIVE_INT, ArgumentParser, ReleasedFlag, UserError, add_data_args,
                      add_model_args, add_released_flags, add_run_args, add_training_args, number, run_main)
from util.datasets import ImageFolder, eval_transform, make_loader, train_transform, training_classes
from util.io import write_text
from util.logger import append_json_line, keep_log_before, tensorboard_writer
from util.lr_sched import set_lr_from_blr
from util.train_setup import start_training
from util.seed import derive_seed, seed_all


def get_args_parser():
    parser = ArgumentParser('Probing: train a classification head on frozen MAE features', prog='main_prob.py')
    # the released main_prob.py's min_lr; weight decay as its README's probing command passes it
    add_training_args(parser, batch_size=32, epochs=20, warmup_epochs=5, weight_decay=0.2, min_lr=1e-6,
                      weight_decay_help='AdamW weight decay of every head parameter, as the released probe')
    parser.add_argument('--no_weight_decay_1d', action='store_true',
                        help="no weight decay on biases and other 1-D parameters (LayerNorm weights), MAE's "
                             'fine-tuning habit; the released probe decays them too')
    parser.add_argument('--finetune', default='', help='pre-trained MAE checkpoint for the encoder')
    parser.add_argument('--drop_path', type=number(float, 0, 1, high_open=True), default=0.0,
                        help='drop path rate of the ViT head')
    parser.add_argument('--smoothing', type=number(float, 0, 1, high_open=True), default=0.1,
                        help='label smoothing')
    parser.add_argument('--dist_eval', action='store_true', help='shard evaluation over the processes')
    parser.add_argument('--eval', action='store_true', help='evaluate the resumed checkpoint only')
    parser.add_argument('--keep_last', default=2, type=NON_NEGATIVE_INT,
                        help="keep the newest N epoch checkpoints besides checkpoint-final.pth (each holds the whole "
                             "model and the head's optimiser state, about 2 GB at ViT-L); 0: keep every one")
    add_model_args(parser, norm_pix_help='accepted because the released command passes it; no effect on '
                                         'probing (no decoder)')
    add_data_args(parser, 'dataset root: <data_path>/train/<class>/<image> and <data_path>/val/<class>/<image>',
                  min_crop_scale=0.08)  # MAE's linear-probe recipe
    add_run_args(parser)
    never_applied = 'the released probe parsed it and never applied mixup, cutmix or random erasing'
    add_released_flags(parser, DIST_ON_ITP, *(
        ReleasedFlag(flag, no_effect=never_applied, **kwargs) for flag, kwargs in (
            ('--mixup', dict(type=float, default=0.8)), ('--cutmix', dict(type=float, default=1.0)),
            ('--cutmix_minmax', dict(type=float, nargs='+', default=None)), ('--mixup_prob', dict(type=float, default=1.0)),
            ('--mixup_switch_prob', dict(type=float, default=0.5)), ('--mixup_mode', dict(default='batch')),
            ('--reprob', dict(type=float, default=0.25)), ('--remode', dict(default='pixel')),
            ('--recount', dict(type=int, default=1)), ('--resplit', dict(action='store_true')))))
    return parser


def main(args):
    device = start_training(args)
    model = build_model(args.model, img_size=args.input_size,
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes, no_decoder=True, drop_path_rate=args.drop_path)
    args.input_size = model.parts().image_size
    # the head's classes, in label order, travel with it: val/ and every test folder are labelled through them
    classes = training_classes(os.path.join(args.data_path, 'train'))
    if len(classes) > args.num_classes:
        raise UserError(f"{len(classes)} classes in {args.data_path}/train do not fit --num_classes {args.num_classes}")
    labels = {c: i for i, c in enumerate(classes)}
    dataset_train = ImageFolder(os.path.join(args.data_path, 'train'), labels=labels,
                                transform=train_transform(args.input_size, args.min_crop_scale, args.hflip))
    dataset_val = ImageFolder(os.path.join(args.data_path, 'val'), labels=labels,
                              transform=eval_transform(args.input_size))
    if args.output_dir and distributed.is_main_process():
        write_text(os.path.join(args.output_dir, 'classes.txt'), ''.join(c + '\n' for c in classes))
    print(f"{len(dataset_train)} training and {len(dataset_val)} validation images, {len(classes)} classes")
    data_loader_train = make_loader(dataset_train, args, train=True)
    if args.dist_eval:
        data_loader_val = make_loader(dataset_val, args, train=False)
    else:
        data_loader_val = torch.utils.data.DataLoader(dataset_val, batch_size=args.batch_size,
                                                      num_workers=args.num_workers, shuffle=False)

    if args.finetune and not args.eval:
        load_finetune_for_probe(model, args.finetune)
    elif not args.finetune:
        print("warning: no --finetune checkpoint: the encoder stays at its random initialisation")
    # only the head trains: the encoder is a frozen feature extractor (classifier_pos_embed stays fixed)
    for name, p in model.named_parameters():
        if not name.startswith(model.parts().head):
            p.requires_grad = False
    model, model_without_ddp = distributed.wrap_model(model.to(device), args, device)
    set_lr_from_blr(args)
    params = (param_groups_weight_decay(model_without_ddp, args.weight_decay) if args.no_weight_decay_1d
              else [p for p in model_without_ddp.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    loss_scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    criterion = (LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0
                 else torch.nn.CrossEntropyLoss())
    resumed = resume_training(args, model_without_ddp, optimizer, loss_scaler)
    log_path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else None
    if args.eval:
        if not resumed:
            raise UserError("--eval needs a trained checkpoint: pass --resume, or an --output_dir holding one")
        evaluate(data_loader_val, model, device)
        return

    keep_log_before(log_path, args.start_epoch)  # epochs after the checkpoint are redone
    log_writer = tensorboard_writer(args.log_dir)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    max_accuracy = 0.0
    for epoch in range(args.start_epoch, args.epochs):
        seed_all(derive_seed(args.seed, epoch, args.rank))
        data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch,
                                      loss_scaler, log_writer=log_writer, args=args)
        test_stats = evaluate(data_loader_val, model, device, synchronize=args.dist_eval)
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        print(f"Accuracy on {len(dataset_val)} validation images: {test_stats['acc1']:.1f}% "
              f"(max {max_accuracy:.2f}%)")
        if log_writer is not None:
            for k in ('acc1', 'acc5', 'loss'):
                log_writer.add_scalar(f'perf/test_{k}', test_stats[k], epoch)
            log_writer.flush()
        # log line, then checkpoints (see main_pretrain.py); a kill during evaluation redoes the epoch
        if args.output_dir and distributed.is_main_process():
            append_json_line(log_path, {**{f'train_{k}': v for k, v in train_stats.items()},
                                        **{f'test_{k}': v for k, v in test_stats.items()}, 'epoch': epoch})
            if epoch + 1 == args.epochs:
                save_checkpoint(checkpoint_path(args.output_dir, 'final'), model_without_ddp, optimizer,
                                epoch, loss_scaler, args, classes=classes)
            save_checkpoint(checkpoint_path(args.output_dir, epoch), model_without_ddp, optimizer,
                            epoch, loss_scaler, args, classes=classes)
            if args.keep_last:  # after the new one is written: a kill leaves at least what was there
                prune_checkpoints(args.output_dir, args.keep_last)
        distributed.barrier()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    distributed.destroy()


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
