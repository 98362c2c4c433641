"""--objective: what a test-time step minimises, by name (docs/method.md, "Objectives"). An objective makes a
step's views of the image and returns named losses of them, as the model's test_time_losses does; the
trainers sum them, each times its weight (the model's declared ones, then --loss_weight), and record each
by name. A plugin registers its own with register_objective.

  mae      TTT-MAE: the model's declared test-time losses of masked views (the paper; the default)
  entropy  the entropy of each view's prediction (the eval crop: single-image TENT with --finetune_mode norm)
  memo     the entropy of the prediction averaged over augmented views (MEMO, Zhang, Levine, Finn 2022)

Each objective brings its own recipe: the values of flags it sets where the command line does not
(util/cli.py applies them; --help lists them).
"""
import numpy as np
import torch
from PIL import Image, ImageOps

from util.datasets import crop_box, normalize, training_views
from util.errors import UserError
from util.seed import Stream, derive_seed

OBJECTIVES = {}


def register_objective(name):
    """Register an Objective subclass under `name` (--objective NAME)."""
    def register(cls):
        OBJECTIVES[name] = cls
        return cls
    return register


@register_objective('mae')
class Objective:
    """TTT-MAE's objective, and the interface of every other: recipe (flag -> value where the command line sets
    none), needs_head, weights(model), views(images, raws, crops) and losses(model, views, masks)."""
    recipe = {}
    needs_head = False  # the losses read the classification head (a model without one is refused)

    def __init__(self, args, class_subset=None):
        self.args, self.class_subset = args, class_subset

    def weights(self, model):
        """Each loss's weight where --loss_weight sets none (1 where this gives none)."""
        return dict(model.test_time_loss_weights)

    def views(self, images, raws, crops):
        """(accum_iter, K, batch_size, 3, H, W) views of K images (K, 1, 3, H, W), from their decoded uint8 images
        raws and crop generators crops (one per image, seeded by (seed, image))."""
        return training_views(images, raws, crops, self.args)

    def losses(self, model, views, masks):
        """{name: loss} of a batch of views (B, 3, H, W) of one image with shuffle orders masks (B, L)."""
        return model.test_time_losses(views, self.args.mask_ratio, masks)

    def logits(self, model, views):
        """The head's outputs for the views, restricted to the test set's classes where it has a subset (its
        predictions are restricted so: the objective reads the same outputs)."""
        logits = model.logits(views).float()
        return logits if self.class_subset is None else logits[:, self.class_subset]


def entropy(log_p):
    return -(log_p.exp() * log_p).sum(dim=-1)


@register_objective('entropy')
class Entropy(Objective):
    """The mean entropy of each view's prediction: with the default single view, the eval crop's (TENT's loss on
    one image; --finetune_mode norm adapts what TENT adapts). Online over a stream, with SGD at TENT's
    2.5e-4 for 64 images scaled to one image at a time (2.5e-4 / 64), it is TENT's online setting."""
    recipe = {'batch_size': 1, 'steps_per_example': 1, 'finetune_mode': 'norm', 'optimizer_type': 'sgd',
              'optimizer_momentum': 0.9, 'lr': 2.5e-4 / 64, 'single_crop': True,
              # online (main_online_ttt.py), TENT's: one lr, no clipping, the momentum carried over the stream
              'online_window': 1, 'encoder_lr_scale': 1., 'clip_grad': 0., 'online_keep_optimizer': True}
    needs_head = True

    def weights(self, model):
        return {}

    def losses(self, model, views, masks):
        return {'entropy': entropy(self.logits(model, views).log_softmax(dim=-1)).mean()}


@register_objective('memo')
class Memo(Objective):
    """MEMO: the entropy of the marginal prediction, the predictions' probabilities averaged over B augmented
    views of the image. Each view is a random resized crop and flip of the decoded image, then AugMix-style
    chains of MEMO's augmentation list (memo_view), drawn from a generator seeded by (seed, image): a
    resumed or sharded run draws the same views. MEMO's ViT recipe: 64 views, 1 step, every parameter (the
    encoder and the head: what its gradient reaches), AdamW at 1e-5 with weight decay 0.01, the weights
    reset after every image."""
    recipe = {'batch_size': 64, 'steps_per_example': 1, 'finetune_mode': 'reached', 'optimizer_type': 'adam_w',
              'lr': 1e-5, 'weight_decay': 0.01, 'single_crop': False,
              'online_window': 1, 'encoder_lr_scale': 1., 'clip_grad': 0.}  # online: one lr, no clipping
    needs_head = True

    def __init__(self, args, class_subset=None):
        super().__init__(args, class_subset)
        if args.single_crop:
            raise UserError("--objective memo draws its own augmented views of the decoded image: drop --single_crop")
        if args.batch_size < 2:
            raise UserError(f"--objective memo averages the predictions of several views: --batch_size must be 2 or "
                            f"more, got {args.batch_size}")
        if args.accum_iter > 1:  # the entropy of an average does not split into micro-batches
            raise UserError("--objective memo averages the predictions of all its views at once: pass --accum_iter 1")

    def weights(self, model):
        return {}

    def views(self, images, raws, crops):
        size, device = images.shape[-1], images.device
        per_image = []
        for raw, gen in zip(raws, crops):
            rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=gen)))
            picture = Image.fromarray(raw.permute(1, 2, 0).cpu().numpy())
            micro = [torch.stack([memo_view(picture, size, gen, rng) for _ in range(self.args.batch_size)])
                     for _ in range(self.args.accum_iter)]
            per_image.append(torch.stack(micro))
        return torch.stack(per_image, dim=1).to(device)

    def losses(self, model, views, masks):
        log_p = self.logits(model, views).log_softmax(dim=-1)
        marginal = log_p.logsumexp(dim=0) - np.log(log_p.shape[0])  # log of the mean probability over the views
        return {'memo': entropy(marginal.clamp(min=torch.finfo(marginal.dtype).min))}


# MEMO's augmentation list (its code's third_party.py, after AugMix's augmentations.py) at its severity 1: the nine
# operations that do not overlap ImageNet-C's corruptions (no colour, contrast, brightness or sharpness), each
# level drawn uniformly in (0.1, 1) of the operation's maximum, each sign a coin flip; AugMix's mixture of 3
# chains of 1 to 3 operations, Dirichlet(1, 1, 1) weights, then a Beta(1, 1) blend with the un-augmented view.
# Written out here: torchvision's AugMix has other operations and defaults.
def _level(rng):
    return rng.uniform(0.1, 1)


def _signed(value, rng):
    return -value if rng.uniform() > 0.5 else value


def _affine(picture, coefficients):
    return picture.transform(picture.size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=128)


MEMO_OPERATIONS = [
    lambda im, rng: ImageOps.autocontrast(im),
    lambda im, rng: ImageOps.equalize(im),
    lambda im, rng: im.rotate(_signed(int(_level(rng) * 30 / 10), rng), resample=Image.BILINEAR, fillcolor=128),
    lambda im, rng: ImageOps.solarize(im, 256 - int(_level(rng) * 256 / 10)),
    lambda im, rng: _affine(im, (1, _signed(_level(rng) * 0.3 / 10, rng), 0, 0, 1, 0)),  # shear x
    lambda im, rng: _affine(im, (1, 0, 0, _signed(_level(rng) * 0.3 / 10, rng), 1, 0)),  # shear y
    lambda im, rng: _affine(im, (1, 0, _signed(int(_level(rng) * im.size[0] / 3 / 10), rng), 0, 1, 0)),  # translate x
    lambda im, rng: _affine(im, (1, 0, 0, 0, 1, _signed(int(_level(rng) * im.size[1] / 3 / 10), rng))),  # translate y
    lambda im, rng: ImageOps.posterize(im, 4 - int(_level(rng) * 4 / 10)),
]


def memo_view(picture, size, gen, rng):
    """One of MEMO's views of a PIL image: RandomResizedCrop(size) (torchvision's default area 0.08-1, bilinear)
    and a flip, drawn from the torch generator gen, then the AugMix mixture drawn from the numpy generator
    rng; normalised (3, size, size)."""
    top, left, h, w = crop_box(picture.height, picture.width, gen, scale=(0.08, 1.0))
    view = picture.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if torch.rand(1, generator=gen).item() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    weights, blend = np.float32(rng.dirichlet([1., 1., 1.])), np.float32(rng.beta(1., 1.))
    mix = torch.zeros(3, size, size)
    for weight in weights:
        chain = view
        for _ in range(rng.integers(1, 4)):
            chain = MEMO_OPERATIONS[rng.integers(len(MEMO_OPERATIONS))](chain, rng)
        mix += float(weight) * normalize(chain)
    return float(blend) * normalize(view) + (1 - float(blend)) * mix
