"""Online TTT-MAE (docs/online.md): the paper's trainer with the weights carried from image to image over a
stream, and the remedies against drift. Each method here overrides one hook of
engine_test_time.TestTimeTrainer; the stream itself (order, window, saved state) is util/online.py's."""
import torch

from engine_test_time import TestTimeTrainer
from util.seed import RESTORE, derive_seed


def lr_groups(names, encoder_lr_scale):
    """[(names, lr scale)] of the adapted weights: one group, or with --encoder_lr_scale the encoder's
    weights and then the decoder's and mask_token (the decoder side of the MAE)."""
    if encoder_lr_scale == 1:
        return [(list(names), 1.)]
    encoder = [n for n in names if not n.startswith('decoder') and n != 'mask_token']
    rest = [n for n in names if n not in encoder]
    return [(group, scale) for group, scale in ((encoder, encoder_lr_scale), (rest, 1.)) if group]


class OnlineTrainer(TestTimeTrainer):
    """TestTimeTrainer whose weights carry over from one image of the stream to the next, with:
    --online_reset_every (back to the loaded weights every N images), --online_keep_optimizer (carry the
    optimiser state too), --encoder_lr_scale, --clip_grad, --online_anchor (a pull toward the loaded
    weights), --online_restore (stochastic restore) and --online_ema (classify with an average of the
    adapted weights)."""

    def __init__(self, model, args, device, class_subset=None):
        super().__init__(model, args, device, class_subset)
        self.images = 0  # images of the stream begun, for the periodic reset
        # --online_ema: the weights that classify, an average of the adapted ones
        self.average = {name: w.clone() for name, w in self.start.items()} if args.online_ema else None

    def param_groups(self):
        return [{'params': [self.params[n] for n in names], 'lr': self.args.lr * scale}
                for names, scale in lr_groups(self.params, self.args.encoder_lr_scale)]

    @torch.no_grad()
    def begin_image(self):
        every = self.args.online_reset_every
        back = bool(every) and self.images % every == 0
        self.reset(weights=back, optimizer=not self.args.online_keep_optimizer)
        if back and self.average is not None:
            for name, w in self.average.items():
                w.copy_(self.start[name])
        self.images += 1

    def objective(self, losses):
        objective = super().objective(losses)
        if self.args.online_anchor:  # anchor/2 ||w - w0||^2, spread over the step's micro-batches
            distance = sum((p - self.start[n]).square().sum() for n, p in self.params.items())
            objective = objective + self.args.online_anchor / (2 * self.args.accum_iter) * distance
        return objective

    def update(self):
        if self.args.clip_grad:  # over all adapted weights, as torch.nn.utils.clip_grad_norm_
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.args.clip_grad)
        super().update()

    @torch.no_grad()
    def after_step(self, index, step):
        if self.args.online_restore:  # each weight back to its loaded value with this probability
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.args.seed, index, RESTORE, step))
            back = torch.rand(sum(p.numel() for p in self.params.values()), generator=gen, device=self.device)
            back = back < self.args.online_restore
            for (name, p), keep in zip(self.params.items(), back.split([p.numel() for p in self.params.values()])):
                p.copy_(torch.where(keep.view(p.shape), self.start[name], p))
        if self.average is not None:  # average = m average + (1 - m) w
            torch._foreach_lerp_(list(self.average.values()), list(self.params.values()), 1 - self.args.online_ema)

    def logits(self, image):
        if self.average is None:
            return super().logits(image)
        return torch.func.functional_call(self.model, self.average, (image,), {'mask_ratio': 0, 'reconstruct': False})[3]

    @torch.no_grad()
    def distance_from_start(self):
        """||w - w0||: how far the adapted weights are from the loaded ones (a host float)."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - self.start[n])
                                                     for n, p in self.params.items()])).item()

    def state(self):
        return {**super().state(), 'images': self.images,
                **({'average': {n: w.clone() for n, w in self.average.items()}} if self.average is not None else {})}

    @torch.no_grad()
    def load_state(self, state):
        super().load_state(state)
        self.images = state['images']
        if self.average is not None:
            for name, w in self.average.items():
                w.copy_(state['average'][name])
