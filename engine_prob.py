"""Training and evaluation loops for the classification head on frozen features (probing)."""
import torch

import engine_pretrain
from util.logger import MetricLogger


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler,
                    log_writer=None, args=None):
    """One epoch of the head on frozen features: pre-training's loop with the classification loss."""
    def classification_loss(samples, targets):  # through forward: DistributedDataParallel synchronises there
        return criterion(model(samples, mask_ratio=0, reconstruct=False)[3], targets)
    return engine_pretrain.train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer,
                                           args, compute_loss=classification_loss, tag='loss')


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
