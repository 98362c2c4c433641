"""The fast trainer (--parallel_images K, --compile): the paper's computation of engine_test_time, arranged
for speed. Each of K images' trainable weights is one row of a flat (K, N) tensor, trained with the
model's other weights fixed through torch.func.functional_call; K > 1 runs the model on every row through
torch.func.vmap. --compile turns the step (forward, losses, backward) and the classification into fused
kernels, on CUDA replayed as CUDA graphs, which read weights, gradients and optimiser state at fixed
addresses (the optimiser update on the one flat tensor stays eager: a few passes over it).

The same interface as engine_test_time.TestTimeTrainer, and the same function: tests/test_engine_fast.py
compares the two (bit for bit with K = 1 and no compilation; to float rounding otherwise).
"""
import contextlib
import logging

import torch

from engine_test_time import (AMP_DTYPES, ModelCall, build_optimizer, classification, crop_generator, image_masks,
                              loss_weights, make_objective, mode_dependent_modules, reached_parameters, step_records,
                              weighted_sum)
from util.errors import UserError
from util.finetune_modes import choose_parameters


class FastTrainer:
    """Weights and optimiser state of K images at once as rows of one flat tensor, reset in place. The
    model stays in eval mode: refused where a module outside the head depends on the mode."""
    __test__ = False  # not a pytest test class

    def __init__(self, model, args, device, k=1, class_subset=None):
        if mode_dependent_modules(model):
            raise UserError("--parallel_images and --compile need a model without dropout, drop path or batch "
                             f"norm outside the head: {', '.join(mode_dependent_modules(model))}")
        self.model, self.args, self.device, self.k = model, args, torch.device(device), k
        self.class_subset = None if class_subset is None else torch.as_tensor(class_subset, device=self.device)
        self.num_patches = model.parts().num_patches
        self.amp_dtype = AMP_DTYPES[args.amp]
        model.eval()
        self.objective = make_objective(args, model, self.class_subset)
        self.loss_weights = loss_weights(model, self.objective, args, self.device)
        trainable = choose_parameters(model, args.finetune_mode, args.seed,
                                      lambda: reached_parameters(model, self.objective, self.device))
        self.names = list(trainable)
        self.shapes = {n: p.shape for n, p in trainable.items()}
        self.start = torch.cat([p.detach().reshape(-1) for p in trainable.values()]).expand(k, -1)
        self.flat = self.start.clone().requires_grad_()
        torch._dynamo.mark_static_address(self.flat)  # updated in place: a graph reads it where it is
        for p in trainable.values():
            p.requires_grad_(False)
        self._losses, self._logits, self._predict = self._functional(model, trainable)
        self.optimizer = build_optimizer([self.flat], args)
        if args.compile:
            self._losses, self._logits = compiled(self._losses, self.device), compiled(self._logits, self.device)
        # optimiser state exists from here on and is zeroed by reset(): a zeroed SGD momentum or Adam
        # state is what a fresh optimiser starts from, and the tensors stay where a capture finds them
        self.flat.grad = torch.zeros_like(self.flat)
        self.optimizer.step()
        self.reset()

    def weights(self, row, prefix=''):
        """{name: weight} of one image's row of the flat tensor (views, no copies)."""
        sizes = [self.shapes[n].numel() for n in self.names]
        return {prefix + n: w.view(self.shapes[n]) for n, w in zip(self.names, row.split(sizes))}

    def _functional(self, model, trainable):
        """losses(views, masks) -> {name: (K,)}, logits(images) and predict(images, masks) of the model with
        row k of the flat weights for image k."""
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        fixed.update(dict(model.named_buffers()))
        # the graphs of --compile read these where they are: without the mark, CUDA graphs copy every
        # frozen weight and buffer (decoder, head) into the graph's own memory on every replay
        for tensor in fixed.values():
            torch._dynamo.mark_static_address(tensor)
        if self.device.type == 'cpu' and (self.k > 1 or self.args.compile):
            # timm's explicit attention: vmap has no batching rule for the CPU's fused kernel, and for
            # sequences this short (17 and 65 tokens for the example) the explicit products compile faster
            for m in model.modules():
                if hasattr(m, 'fused_attn'):
                    m.fused_attn = False
        methods, fixed = ModelCall(model), {f'model.{n}': t for n, t in fixed.items()}

        def call(row, fn, *inputs):
            return torch.func.functional_call(methods, (self.weights(row, 'model.'), fixed), (fn, *inputs))

        def losses(row, views, masks):
            return call(row, self.objective.losses, views, masks)

        def logits(row, image):
            return call(row, lambda m, x: m.logits(x), image)[0]

        def predict(row, image, mask):
            return call(row, lambda m, x, order: m.reconstruct(x, self.args.mask_ratio, order), image, mask)[0]

        flat = self.flat
        if self.k == 1:
            return (lambda views, masks: {n: v.unsqueeze(0) for n, v in losses(flat[0], views[0], masks[0]).items()},
                    lambda images: logits(flat[0], images[0]).unsqueeze(0),
                    lambda images, masks: predict(flat[0], images[0], masks[0]).unsqueeze(0))
        batched = [torch.func.vmap(f) for f in (losses, logits, predict)]
        return (lambda views, masks: batched[0](flat, views, masks),
                lambda images: batched[1](flat, images),
                lambda images, masks: batched[2](flat, images, masks))

    @torch.no_grad()
    def reset(self):
        """Every row back to the loaded weights and a fresh (zeroed) optimiser state, in place."""
        self.flat.copy_(self.start)
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
        self.optimizer.zero_grad(set_to_none=False)  # the gradients stay where a graph finds them

    def adapt(self, indices, labels, images, raws=None, observe=None):
        """As TestTimeTrainer.adapt, the K images (or fewer: the last group of a run, padded with copies of
        its last image) at once."""
        n, pad = len(indices), self.k - len(indices)
        raws = raws or [None] * len(images)
        if pad:
            indices, labels = list(indices) + [indices[-1]] * pad, torch.cat([labels, labels[-1:].expand(pad)])
            images = torch.cat([images, images[-1:].expand(pad, -1, -1, -1, -1)])
            raws = list(raws) + [raws[-1]] * pad
        self.reset()
        masks = torch.stack([image_masks(self.args, i, self.num_patches, self.device) for i in indices], dim=2)
        crops = [crop_generator(self.args, i) for i in indices]
        classified, losses = [self.classify(images, labels)], []
        if observe:
            observe(0, self, images, classified[-1]['ce_loss'])
        for step in range(self.args.steps_per_example):
            losses.append(self.step(self.objective.views(images, raws, crops), masks[step]))
            classified.append(self.classify(images, labels))
            if observe:
                observe(step + 1, self, images, classified[-1]['ce_loss'])
        records = step_records(classified, losses, self.loss_weights, self.args.steps_per_example)  # (steps, K): one copy
        return [{key: value[:, k] for key, value in records.items()} for k in range(n)]

    def step(self, views, masks):
        """One optimiser step of every image from views (A, K, B, 3, H, W) and shuffle orders (A, K, B, L);
        returns each image's losses {name: (K,)} averaged over the A micro-batches."""
        recorded = {}
        for micro_views, micro_masks in zip(views, masks):
            with self._autocast():
                losses = self._losses(micro_views, micro_masks)
            losses = {name: loss.float() / len(views) for name, loss in losses.items()}
            weighted_sum({name: loss.sum() for name, loss in losses.items()}, self.loss_weights).backward()
            for name, loss in losses.items():
                recorded[name] = recorded.get(name, 0.) + loss.detach()
        self.optimizer.step()  # a flat tensor: a few fused passes, left eager
        self.optimizer.zero_grad(set_to_none=False)
        return recorded

    def saved_with_results(self):
        """As TestTimeTrainer's: nothing carries over from one group of images to the next."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def classify(self, images, labels):
        """images (K, 1, 3, H, W), labels (K,) -> classification()'s records, each (K,)."""
        with self._autocast():
            logits = self._logits(images)
        return classification(logits, labels, self.class_subset)

    @torch.no_grad()
    def reconstruct(self, images, orders):
        """The decoder's predictions (K, L, p*p*3) for images (K, 1, 3, H, W) with shuffle orders (K, 1, L)."""
        with self._autocast():
            return self._predict(images, orders).float()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def _not_the_no_cuda_note(record):
    # building the CPU kernels imports torch.utils.cpp_extension, which notes that a CUDA toolkit
    # without a GPU is not used: true, and nothing the user needs to act on
    return not record.getMessage().startswith('No CUDA runtime is found')


def compiled(fn, device):
    """fn through torch.compile's inductor: fused kernels for fixed shapes. On the CPU the kernels are
    called from generated C++ (at the example's size, Python's per-kernel overhead is much of what is
    left); on CUDA the compiled code is replayed as CUDA graphs."""
    if device.type == 'cpu':
        # one function, so a logger holds it once however many trainers compile
        logging.getLogger('torch.utils.cpp_extension').addFilter(_not_the_no_cuda_note)
        return torch.compile(fn, dynamic=False, options={'cpp_wrapper': True})
    return torch.compile(fn, dynamic=False, options={'triton.cudagraphs': True})
