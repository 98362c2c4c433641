"""TTT-MAE's trainer: the encoder adapts to one test image at a time, which is classified after every step
(TestTimeTrainer), and what it is built from (which parameters adapt, the optimiser, the masks, what a
classification records).

TestTimeTrainer is the paper's algorithm over the model's own parameters, and the reference the other
modes are tested against. They are layers with the same interface, chosen by flags that default off:
engine_fast.FastTrainer (--parallel_images, --compile: K images at once as rows of flat weights, vmap,
fused kernels, CUDA graphs) and engine_online.OnlineTrainer (main_online_ttt.py: weights carried over a
stream). The interface, as engine_run.py's loop uses it: k (images adapted at once), adapt(indices,
labels, images, raws, observe), saved_with_results(), reconstruct(images, orders).
"""
import contextlib

import torch
import torch.nn.functional as F

from util import stop_rules
from util.errors import UserError
from util.finetune_modes import choose_parameters
from util.objectives import OBJECTIVES
from util.seed import Stream, derive_seed

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class ModelCall(torch.nn.Module):
    """fn(model, *inputs) as this module's forward, for torch.func.functional_call, which calls a module's forward
    only: the model's named outputs (logits, reconstruct) or an objective's losses with other weights
    (engine_fast.py, engine_online.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *inputs):
        return fn(self.model, *inputs)


def make_objective(args, model, class_subset=None):
    """--objective's (objectives.py), refused in one line for a model without the head it reads."""
    objective = OBJECTIVES[getattr(args, 'objective', 'mae')](args, class_subset)
    if objective.needs_head and not any(n.startswith(model.parts().head) for n in model.state_dict()):
        raise UserError(f"--objective {args.objective} reads the classification head, and --model {args.model} has "
                        f"none")
    return objective


def blank_losses(model, objective, device):
    """The objective's losses of two blank views, each masked by the patches' own order: what it returns, and
    what its gradient reaches, seen once before any image."""
    parts = model.parts()
    images = torch.zeros(2, 3, parts.image_size, parts.image_size, device=device)
    return objective.losses(model, images, torch.arange(parts.num_patches, device=device).expand(2, -1))


@torch.no_grad()
def loss_names(model, objective, device):
    """The names of the losses the objective returns for the model."""
    return list(blank_losses(model, objective, device))


def reached_parameters(model, objective, device):
    """The names of the parameters the objective's gradient reaches: e.g. the head, from the entropy of its
    prediction, and not from the reconstruction loss."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    losses = blank_losses(model, objective, device)
    grads = torch.autograd.grad(sum(losses.values()), list(params.values()), allow_unused=True)
    for n, p in params.items():
        p.requires_grad_(flags[n])
    return {n for n, g in zip(params, grads) if g is not None}


def loss_weights(model, objective, args, device):
    """Each loss's weight in the objective: the objective's (the model's declared ones for mae), then
    --loss_weight's, each of a loss the objective returns."""
    given = getattr(args, 'loss_weight', None) or {}
    if given:
        names = loss_names(model, objective, device)
        unknown = [n for n in given if n not in names]
        if unknown:
            raise UserError(f"--loss_weight {unknown[0]}: --objective {getattr(args, 'objective', 'mae')} with --model "
                            f"{args.model} has no loss of that name (its losses: {', '.join(names)})")
    return {**objective.weights(model), **given}


def build_optimizer(params, args, foreach=True):
    # foreach: one call per update for all weights (on CPU a C++ loop over the same per-tensor kernels,
    # so less Python per step), bitwise the per-parameter loop (tested); torch's default on CUDA already.
    # params: tensors, or param groups with their own 'lr'
    if args.optimizer_type == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.optimizer_momentum, foreach=foreach)
    betas = (0.9, 0.95)
    if args.optimizer_type == 'adam':
        return torch.optim.Adam(params, lr=args.lr, betas=betas, foreach=foreach)
    return torch.optim.AdamW(params, lr=args.lr, betas=betas, weight_decay=args.weight_decay, foreach=foreach)


def predictions(logits, labels, class_subset=None):
    """Top-1 predictions and cross-entropies (per image) of logits (N, C); with class_subset (sorted
    output indices, e.g. ImageNet-R's 200), over those outputs only, as the standard evaluation restricts
    the 1000-way head. Labels and predictions are output indices either way."""
    logits = logits.float()
    if class_subset is None:
        return logits.argmax(dim=1), F.cross_entropy(logits, labels, reduction='none')
    logits = logits[:, class_subset]
    return (class_subset[logits.argmax(dim=1)],
            F.cross_entropy(logits, torch.searchsorted(class_subset, labels), reduction='none'))


def confidence(logits, class_subset=None):
    """Label-free signals per image of logits (N, C): the top-1 probability and the entropy (nats) of the
    softmax, over class_subset's outputs where given, as predictions() restricts them."""
    logits = logits.float() if class_subset is None else logits.float()[:, class_subset]
    log_p = logits.log_softmax(dim=1)
    return log_p.max(dim=1).values.exp(), -(log_p.exp() * log_p).sum(dim=1)


def classification(logits, labels, class_subset=None):
    """What is recorded of each classification: {'pred', 'ce_loss', 'top1_prob', 'entropy'}, each (N,)."""
    pred, ce = predictions(logits, labels, class_subset)
    top1_prob, entropy = confidence(logits, class_subset)
    return {'pred': pred, 'ce_loss': ce, 'top1_prob': top1_prob, 'entropy': entropy}


def mode_dependent_modules(model):
    """Modules outside the head that compute differently in train and eval mode."""
    from timm.layers import DropPath
    found, head = [], model.parts().head
    for name, m in model.named_modules():
        if (name + '.').startswith(head):
            continue
        if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or (isinstance(m, torch.nn.Dropout) and m.p > 0)
                or (isinstance(m, DropPath) and m.drop_prob > 0)):
            found.append(name)
    return found


def weighted_sum(losses, weights):
    """What a step minimises: the sum of the named losses, each times its weight (1 where none is given)."""
    return sum(weights.get(name, 1.) * loss for name, loss in losses.items())


def image_masks(args, index, num_patches, device):
    """Shuffle orders (steps, accum_iter, batch_size, L) of one image's views, drawn from (seed, image) only,
    so that an image sees the same masks whatever the other images, processes or interruptions."""
    gen = torch.Generator(device=device).manual_seed(derive_seed(args.seed, index, Stream.MASKS))
    noise = torch.rand(args.steps_per_example, args.accum_iter, args.batch_size, num_patches,
                       generator=gen, device=device)
    return noise.argsort(dim=-1)


def crop_generator(args, index):
    """The generator of one image's random resized crops (host side, where the crops are cut)."""
    return torch.Generator().manual_seed(derive_seed(args.seed, index, Stream.CROPS))


def step_records(classified, losses, weights, steps, names=()):
    """Each classification's records (classification()) before and after each step, each loss of each step
    as '<name>_loss' and their weighted sum as 'objective', as host arrays whose first axis is the step (and
    the second the image, K at once). An image stopped early (--stop_rule) repeats its last values up to
    `steps`; the losses of one stopped before its first step (names) are NaN."""
    classified = classified + classified[-1:] * (steps + 1 - len(classified))
    records = {key: torch.stack([c[key] for c in classified]) for key in classified[0]}
    losses = losses + losses[-1:] * (steps - len(losses))
    for name in (losses[0] if losses else names):
        records[f'{name}_loss'] = torch.stack([step[name] for step in losses]) if losses else \
            torch.full((steps,), float('nan'))
    records['objective'] = torch.stack([weighted_sum(step, weights) for step in losses]) if losses else \
        torch.full((steps,), float('nan'))
    return {key: value.cpu().numpy() for key, value in records.items()}


class TestTimeTrainer:
    """TTT-MAE, one image at a time, over the model's own parameters (docs/method.md):

        for each image:  back to the loaded weights, a fresh optimiser state   (begin_image)
                         classify it (step 0: the baseline's prediction)
                         for each of --steps_per_example steps:
                             --batch_size views of it, each with its own mask from (seed, image)
                             the objective's named losses (TTT-MAE's: the model's test_time_losses),
                             their weighted sum, backward, an optimiser step
                             classify it

    The released loop puts the model in train mode for the steps and in eval mode to classify. Where no
    module outside the head depends on the mode (the MAE ViTs: no dropout, drop path or batch norm
    there), the model stays in eval mode: the same function, without two walks over the module tree.
    begin_image, views, total, update, after_step, logits and saved_with_results are where online TTT-MAE
    changes the loop (engine_online.OnlineTrainer); the paper's are here.
    """
    __test__ = False  # not a pytest test class
    k = 1  # images adapted at once

    def __init__(self, model, args, device, class_subset=None):
        self.model, self.args, self.device = model, args, torch.device(device)
        self.class_subset = None if class_subset is None else torch.as_tensor(class_subset, device=self.device)
        self.num_patches = model.parts().num_patches
        self.switch_modes = bool(mode_dependent_modules(model))
        model.eval()
        self.objective = make_objective(args, model, self.class_subset)
        self.loss_weights = loss_weights(model, self.objective, args, self.device)
        # --finetune_mode (util/finetune_modes.py); every other parameter frozen
        self.params = choose_parameters(model, args.finetune_mode, args.seed,
                                        lambda: reached_parameters(model, self.objective, self.device))
        self.start = {name: p.detach().clone() for name, p in self.params.items()}  # the loaded weights
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.scaler_start = self.scaler.state_dict()  # fp16: every image starts from the same loss scale
        self.optimizer = build_optimizer(self.param_groups(), args)
        self.stop_rule = args.stop_rule  # (name, parameter) or None: the paper's fixed steps
        # an image may then stop before its first step: the names of the losses it records (as NaN)
        self.loss_names = loss_names(model, self.objective, self.device) if self.stop_rule else ()

    def param_groups(self):
        return [{'params': list(self.params.values())}]

    def adapt(self, indices, labels, images, raws=None, observe=None):
        """Adapt to each image in turn: indices (K,), labels (K,) and eval crops images (K, 1, 3, H, W) on the
        device; raws: per image, the decoded uint8 image random-crop views are cut from (None with
        --single_crop). Returns each image's records (step_records)."""
        raws = raws or [None] * len(images)
        return [self.adapt_image(index, label, image, raw, observe)
                for index, label, image, raw in zip(indices, labels, images, raws)]

    def adapt_image(self, index, label, image, raw=None, observe=None):
        """The paper's loop for one image (1, 3, H, W). observe(step, trainer, images, cross-entropies), if
        given, is called after each classification (a reconstruction figure)."""
        args = self.args
        self.begin_image()
        masks = image_masks(args, index, self.num_patches, self.device)
        crops = crop_generator(args, index)
        classified, losses = [self.classify(image, label)], []
        if observe:
            observe(0, self, image[None], classified[-1]['ce_loss'][None])
        for step in range(args.steps_per_example):
            if self.stop_rule and self.stops(classified, losses):  # --stop_rule: this image needs no more steps
                break
            losses.append(self.step(self.views(image, raw, crops), masks[step]))
            self.after_step(index, step)
            classified.append(self.classify(image, label))
            if observe:
                observe(step + 1, self, image[None], classified[-1]['ce_loss'][None])
        records = step_records(classified, losses, self.loss_weights, args.steps_per_example, self.loss_names)
        return {**records, 'stop_step': len(losses)} if self.stop_rule else records

    def stops(self, classified, losses):
        """Whether --stop_rule stops the image after the steps done so far (util/stop_rules.py), from the
        predictions, their top-1 probabilities and the objective of each step."""
        preds, probs = ([c[key].item() for c in classified] for key in ('pred', 'top1_prob'))
        return stop_rules.fires(*self.stop_rule, len(losses), preds, probs,
                                [weighted_sum(step, self.loss_weights).item() for step in losses])

    def begin_image(self):
        """The paper: every image starts from the loaded weights with a fresh optimiser state."""
        self.reset()

    def views(self, image, raw, crops):
        """A step's views of the image, (accum_iter, batch_size, 3, H, W): the objective's (online: of the
        latest images)."""
        return self.objective.views(image[None], [raw], [crops])[:, 0]

    @torch.no_grad()
    def reset(self, weights=True, optimizer=True):
        """Back to the loaded weights (in place) and/or a fresh optimiser state."""
        if weights:
            for name, p in self.params.items():
                p.copy_(self.start[name])
        if optimizer:
            self.optimizer.state.clear()  # what a new optimiser starts from
            self.scaler.load_state_dict(self.scaler_start)

    def step(self, views, masks):
        """One optimiser step from views (A, B, 3, H, W) with shuffle orders (A, B, L) of A = --accum_iter
        micro-batches, whose gradients add up; returns each loss averaged over them, {name: 0-d tensor}."""
        recorded = {}
        for micro_views, micro_masks in zip(views, masks):
            with self._autocast():
                losses = self.objective.losses(self.model, micro_views, micro_masks)
            losses = {name: loss.float() / len(views) for name, loss in losses.items()}
            self.scaler.scale(self.total(losses)).backward()
            for name, loss in losses.items():
                recorded[name] = recorded.get(name, 0.) + loss.detach()
        self.update()
        return recorded

    def total(self, losses):
        return weighted_sum(losses, self.loss_weights)

    def update(self):
        """The optimiser step from the gradients, which it then clears."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()

    def after_step(self, index, step):
        """Nothing in the paper (online: stochastic restore and the weights' average)."""

    @torch.no_grad()
    def classify(self, image, label):
        """classification()'s records (0-d tensors) of an eval crop (1, 3, H, W)."""
        if self.switch_modes:
            self.model.eval()
        with self._autocast():
            logits = self.logits(image)
        if self.switch_modes:
            self.model.train()
        return {key: value[0] for key, value in classification(logits, label.view(1), self.class_subset).items()}

    def logits(self, image):
        return self.model.logits(image)

    @torch.no_grad()
    def reconstruct(self, images, orders):
        """The decoder's predictions (K, L, p*p*3) for images (K, 1, 3, H, W) with shuffle orders (K, 1, L)."""
        with self._autocast():
            return torch.stack([self.model.reconstruct(image, self.args.mask_ratio, order)[0]
                                for image, order in zip(images, orders)]).float()

    def saved_with_results(self):
        """A block around each flush of the results: what a resumed run needs to continue exactly is saved
        with them. Nothing here: every image starts afresh (online TTT-MAE saves the stream's state)."""
        return contextlib.nullcontext()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
