"""Training and evaluation loops for the classification head on frozen features (probing)."""
import math

import torch

from util.cli import UserError
from util.lr_sched import adjust_learning_rate
from util.logger import MetricLogger


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler,
                    log_writer=None, args=None):
    model.train(True)
    metric_logger = MetricLogger(header=f'Epoch: [{epoch}]', print_freq=args.print_freq)
    accum_iter = args.accum_iter
    use_amp = torch.device(device).type == 'cuda'
    optimizer.zero_grad()
    for data_iter_step, (samples, targets) in enumerate(metric_logger.log_every(data_loader)):
        if data_iter_step % accum_iter == 0:
            adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device_type='cuda', enabled=use_amp):
            _, _, _, logits = model(samples, mask_ratio=0, reconstruct=False)
            loss = criterion(logits, targets)
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
            step_1000x = int((data_iter_step / len(data_loader) + epoch) * 1000)
            log_writer.add_scalar('loss', loss_value, step_1000x)
            log_writer.add_scalar('lr', lr, step_1000x)
    stats = metric_logger.averages()
    print("Averaged stats:", stats)
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device, synchronize=True):
    """Top-1/top-5 accuracy (percent) and cross-entropy over the loader."""
    model.eval()
    metric_logger = MetricLogger(header='Test:', print_freq=50)
    use_amp = torch.device(device).type == 'cuda'
    for images, targets in metric_logger.log_every(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device_type='cuda', enabled=use_amp):
            _, _, _, logits = model(images, mask_ratio=0, reconstruct=False)
            loss = torch.nn.functional.cross_entropy(logits, targets)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == targets[:, None]
        n = images.shape[0]
        metric_logger.update(n=n, loss=loss.item(), acc1=correct[:, 0].float().mean().item() * 100,
                             acc5=correct.any(dim=1).float().mean().item() * 100)
    stats = metric_logger.averages(synchronize)
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats
