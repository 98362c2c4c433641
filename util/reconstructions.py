"""Pictures of test-time training at work (the paper's Figure 1): for chosen images, the input, the masked
input and the reconstruction under one fixed mask before adaptation and as the steps proceed, with the
classification loss of every step. One PNG per image in OUT/reconstructions/."""
import os

import torch

from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.io import save_png
from util.seed import Stream, derive_seed


def shown_steps(steps):
    """Step 0, the last step and a few between."""
    return sorted({s for s in (0, 1, 2, 5, 10, 20, 50) if s <= steps} | {steps})


def to_uint8(image):
    """A normalised (3, H, W) image -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def compose(model, image, pred, order, mask_ratio):
    """(masked input, reconstruction) of a normalised (3, H, W) image for the decoder's prediction (L, p*p*3)
    under the shuffle order (L,): removed patches predicted, kept ones pasted back from the input. With
    norm_pix_loss the prediction is in each patch's normalised units, mapped back with the patch's own
    mean and variance."""
    target = model.patchify(image[None].cpu())[0]
    pred = pred.cpu()
    if model.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.e-6) ** .5 + mean
    removed = torch.zeros(len(order), dtype=torch.bool)
    removed[order[int(len(order) * (1 - mask_ratio)):].cpu()] = True
    gray = model.patchify(((0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
                          .expand(1, 3, *image.shape[1:]))[0]
    masked = torch.where(removed[:, None], gray, target)
    recon = torch.where(removed[:, None], pred, target)
    return to_uint8(model.unpatchify(masked[None])[0]), to_uint8(model.unpatchify(recon[None])[0])


def save_figure(path, title, panels):
    """panels: [(caption, (H, W, 3) uint8)], one row, written atomically as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.5))
    for ax, (caption, picture) in zip(axes, panels):
        ax.imshow(picture, interpolation='nearest')
        ax.set_title(caption, fontsize=8)
        ax.axis('off')
    fig.suptitle(title, fontsize=8, wrap=True)
    save_png(fig, path, 110)


class Reconstructions:
    """The figures of the chosen images: engine_run.adapt_images asks for an observer of each group of
    images, which a trainer calls after each classification (None for a group without a chosen image)."""

    def __init__(self, args, dataset, indices):
        self.args, self.dataset, self.chosen = args, dataset, {int(i) for i in indices}
        self.names = {label: name for name, label in dataset.class_to_idx.items()}
        self.folder = os.path.join(args.output_dir, 'reconstructions')

    def observer(self, indices):
        wanted = [(k, i) for k, i in enumerate(indices) if i in self.chosen]
        return _Observer(self, indices, wanted) if wanted else None


class _Observer:
    def __init__(self, parent, indices, wanted):
        self.parent, self.indices, self.wanted = parent, indices, wanted
        self.steps = shown_steps(parent.args.steps_per_example)
        self.panels = {i: [] for _, i in wanted}
        self.losses = {i: [] for _, i in wanted}

    def __call__(self, step, trainer, images, ces):
        args = self.parent.args
        for k, index in self.wanted:
            self.losses[index].append(float(ces[k]))
        if step not in self.steps:
            return
        indices = list(self.indices) + [self.indices[-1]] * (len(images) - len(self.indices))  # padded groups
        orders = torch.stack([torch.rand(trainer.num_patches, generator=torch.Generator().manual_seed(
            derive_seed(args.seed, i, Stream.FIGURE_MASKS))).argsort() for i in indices]).to(trainer.device)
        preds = trainer.reconstruct(images, orders[:, None])
        for k, index in self.wanted:
            masked, recon = compose(trainer.model, images[k, 0], preds[k], orders[k], args.mask_ratio)
            if step == 0:
                self.panels[index] += [('input', to_uint8(images[k, 0])), ('masked', masked)]
            self.panels[index].append((f'step {step}: CE {self.losses[index][-1]:.2f}', recon))
            if step == self.steps[-1]:
                self._save(index)

    def _save(self, index):
        parent = self.parent
        path, label = parent.dataset.samples[index]
        name = os.path.relpath(path, parent.args.data_path)
        losses = ' '.join(f'{x:.2f}' for x in self.losses[index])
        title = f"{name} (class {parent.names.get(label, label)}): cross-entropy per step {losses}"
        stem = os.path.splitext(os.path.basename(path))[0]
        save_figure(os.path.join(parent.folder, f'{index:06d}_{stem}.png'), title, self.panels[index])
