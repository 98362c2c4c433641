"""One epoch of MAE pre-training."""
from util.train_loop import train_one_epoch as run_epoch


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None, args=None):
    def mae_loss(samples, _):
        return model(samples, mask_ratio=args.mask_ratio)[0]['mae']
    return run_epoch(model, mae_loss, data_loader, optimizer, device, epoch, loss_scaler, args,
                     log_writer, tag='train_loss')
