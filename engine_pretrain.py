"""The training loop of MAE pre-training, which probing shares (engine_prob.py)."""
import math

import torch

from util.errors import UserError
from util.logger import MetricLogger
from util.lr_sched import adjust_learning_rate


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None, args=None,
                    compute_loss=None, tag='train_loss'):
    """One epoch: lr set per iteration from the fractional epoch, gradient accumulation, AMP on CUDA, a
    stop on a non-finite loss, metric logging and TensorBoard scalars. compute_loss(samples, targets) ->
    scalar loss, both on the device; by default MAE's reconstruction loss (probing passes its own)."""
    if compute_loss is None:  # through forward: DistributedDataParallel synchronises gradients there
        compute_loss = lambda samples, _: model(samples, mask_ratio=args.mask_ratio)[0]['mae']
    model.train(True)
    metric_logger = MetricLogger(header=f'Epoch: [{epoch}]', print_freq=args.print_freq)
    accum_iter = args.accum_iter
    use_amp = torch.device(device).type == 'cuda'
    optimizer.zero_grad()
    for data_iter_step, (samples, targets) in enumerate(metric_logger.log_every(data_loader)):
        # lr is set per iteration from the fractional epoch
        if data_iter_step % accum_iter == 0:
            adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device_type='cuda', enabled=use_amp):
            loss = compute_loss(samples, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at epoch {epoch}, iteration {data_iter_step}: stopping; "
                            f"the last saved checkpoint in {args.output_dir or '(none)'} is kept")
        update = (data_iter_step + 1) % accum_iter == 0
        loss_scaler.scale(loss / accum_iter).backward()
        if update:
            loss_scaler.step(optimizer)
            loss_scaler.update()
            optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(loss=loss_value, lr=lr)
        if log_writer is not None and update:
            # x-axis in units of 1000 samples per GPU, as MAE, so runs with different batch sizes align
            step_1000x = int((data_iter_step / len(data_loader) + epoch) * 1000)
            log_writer.add_scalar(tag, loss_value, step_1000x)
            log_writer.add_scalar('lr', lr, step_1000x)
    stats = metric_logger.averages()
    print("Averaged stats:", stats)
    return stats
