"""The released code's way of running test-time training, kept as the benchmarks' timing baseline only (the
tests check engine_test_time.TestTimeTrainer by hand and against a recording): for every image, rebuild the
model from a host copy of the weights, build a new optimiser (torch's default per-parameter update on CPU),
decode and transform the image again for every step and stack `batch_size` host-side copies of it (the
released loader's single-crop batch), and decode it again for every classification. Its masks are those of
engine_test_time (from (seed, image index)).
"""
import copy

import torch

from engine_test_time import build_optimizer, make_objective, predictions, reached_parameters
from util.finetune_modes import choose_parameters
from util.datasets import eval_transform, load_rgb
from util.seed import Stream, derive_seed


def reference_adapt(base_model_cpu, path, label, index, args, device, amp_dtype=None):
    """Returns (prediction, cross-entropy) before and after each step and the MAE loss of each step, for
    one image with single-crop views; amp_dtype: autocast the forward passes (the released code had none;
    for comparisons in the same precision). The loss is summed over micro-batches in float32, as the
    engine records it."""
    model = copy.deepcopy(base_model_cpu).to(device)
    autocast = lambda: torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None)
    reached = lambda: reached_parameters(model, make_objective(args, model), device)  # noqa: E731
    optimizer = build_optimizer(list(choose_parameters(model, args.finetune_mode, args.seed, reached).values()), args,
                                foreach=None)
    transform = eval_transform(args.input_size)
    num_patches = model.patch_embed.num_patches
    gen = torch.Generator(device=device).manual_seed(derive_seed(args.seed, index, Stream.MASKS))
    masks = torch.rand(args.steps_per_example, args.accum_iter, args.batch_size, num_patches,
                       generator=gen, device=device).argsort(dim=-1)

    def classify():
        model.eval()
        with torch.no_grad():
            image = transform(load_rgb(path)).unsqueeze(0).to(device)
            with autocast():
                logits = model.logits(image)
        model.train()
        pred, ce = predictions(logits, torch.tensor([label], device=device))
        return pred.item(), ce.item()

    classified, losses = [classify()], []
    for step in range(args.steps_per_example):
        step_loss = 0.
        for micro in range(args.accum_iter):
            image = transform(load_rgb(path))
            views = torch.stack([image for _ in range(args.batch_size)]).to(device)
            with autocast():
                loss = model(views, mask_ratio=args.mask_ratio, input_mask=masks[step, micro])[0]['mae']
            (loss / args.accum_iter).backward()
            step_loss = step_loss + (loss.float() / args.accum_iter).detach()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(step_loss))
        classified.append(classify())
    preds, ces = zip(*classified)
    return list(preds), list(ces), losses
