"""The test-time loops: adapt the encoder to each test image and classify it after every step, and the
baseline pass without adaptation.

What happens to one image (docs/method.md): the trainable weights go back to the loaded ones and the
optimiser state to a fresh one; then, `steps_per_example` times, `batch_size` views of the image, each
with its own mask, one optimiser step on their masked-reconstruction loss, and a classification of
the eval crop (also once before the first step). Masks and crops come from (seed, image index) only,
so results do not depend on the other images, the number of processes or interruptions.

`TestTimeTrainer` holds the adaptation state of K images at once (K = --parallel_images): one set of
weights and optimiser state per image, the weights as one row of a flat tensor. K = 1 runs the model on
row 0, op for op the released computation; K > 1 runs it on K rows through torch.func.vmap. Both go
through the same step.
"""
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from models_mae import HEAD_PREFIXES
from util import distributed
from util.errors import UserError
from util.datasets import training_views
from util.logger import ProgressLine
from util.seed import derive_seed
from util.signals import StopRequested

FINETUNE_MODES = ('encoder', 'all', 'encoder_no_cls_no_msk')
OPTIMIZERS = ('sgd', 'adam', 'adam_w')
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def trainable_parameters(model, finetune_mode):
    """{name: parameter} adapted at test time; every other parameter is frozen.

    The head gets no gradient from the reconstruction loss, so it is frozen outright (the same result,
    less memory); the sin-cos tables are fixed.
    """
    chosen = {}
    for name, p in model.named_parameters():
        train = not name.endswith('pos_embed') and not name.startswith(HEAD_PREFIXES)
        if finetune_mode in ('encoder', 'encoder_no_cls_no_msk'):
            train = train and not name.startswith('decoder')
        if finetune_mode == 'encoder_no_cls_no_msk':
            train = train and name not in ('cls_token', 'mask_token')
        p.requires_grad_(train)
        if train:
            chosen[name] = p
    return chosen


def lr_groups(names, encoder_lr_scale):
    """[(names, lr scale)] of the adapted weights: one group, or with --encoder_lr_scale the encoder's
    weights and then the decoder's and mask_token (the decoder side of the MAE)."""
    if encoder_lr_scale == 1:
        return [(list(names), 1.)]
    encoder = [n for n in names if not n.startswith('decoder') and n != 'mask_token']
    rest = [n for n in names if n not in encoder]
    return [(group, scale) for group, scale in ((encoder, encoder_lr_scale), (rest, 1.)) if group]


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


def mode_dependent_modules(model):
    """Modules outside the head that compute differently in train and eval mode."""
    from timm.layers import DropPath
    found = []
    for name, m in model.named_modules():
        if name.startswith(HEAD_PREFIXES) or name in ('head', 'bn'):
            continue
        if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or (isinstance(m, torch.nn.Dropout) and m.p > 0)
                or (isinstance(m, DropPath) and m.drop_prob > 0)):
            found.append(name)
    return found


class NamedOutputs(torch.nn.Module):
    """The model's named outputs (mae_loss, logits, reconstruct) as one forward(name, *inputs), for
    torch.func.functional_call, which calls a module's forward only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, name, *inputs):
        return getattr(self.model, name)(*inputs)


class TestTimeTrainer:
    """Weights and optimiser state of K images, reset in place, and the step that adapts them.

    Each image's trainable weights are one row of a flat (K, N) tensor (two with --encoder_lr_scale, one
    per learning rate), trained with the model's other weights fixed (torch.func.functional_call): K = 1
    runs the model on row 0, the released computation
    op for op (bitwise its own parameters, tested); K > 1 runs it on every row through torch.func.vmap.
    --compile turns the step (forward, loss, backward) and the classification of either into fused
    kernels, on CUDA replayed as CUDA graphs (the optimiser update on the one flat tensor stays eager: a
    few passes over it). Weights, gradients and optimiser state stay at fixed addresses, as graphs need.

    The released loop puts the model in train mode for the reconstruction steps and in eval mode to
    classify. When no module outside the head depends on the mode (the MAE ViTs: no dropout, drop path
    or batch norm there), the model stays in eval mode: the same function, without two walks over the
    module tree per step.
    """
    __test__ = False  # not a pytest test class

    def __init__(self, model, args, device, k=1, class_subset=None):
        self.model, self.args, self.device, self.k = model, args, torch.device(device), k
        self.class_subset = None if class_subset is None else torch.as_tensor(class_subset, device=self.device)
        self.switch_modes = bool(mode_dependent_modules(model))
        model.eval()
        trainable = trainable_parameters(model, args.finetune_mode)
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.scaler_start = self.scaler.state_dict()  # fp16: every image starts from the same loss scale
        self.num_patches = model.patch_embed.num_patches
        groups = lr_groups(trainable, args.encoder_lr_scale)
        self.start = [torch.cat([trainable[n].detach().reshape(-1) for n in names]).expand(k, -1)
                      for names, _ in groups]
        self.params = [start.clone().requires_grad_() for start in self.start]
        # --online_ema: the weights that classify, an average of the adapted ones; else the adapted ones
        self.ema = [start.clone() for start in self.start] if args.online_ema else []
        for p in self.params + self.ema:
            torch._dynamo.mark_static_address(p)  # updated in place: a graph reads it where it is
        for p in trainable.values():
            p.requires_grad_(False)
        self._losses, self._logits, self._predict = self._flat_forward(model, trainable, [n for n, _ in groups], args)
        self.optimizer = build_optimizer([{'params': [p], 'lr': args.lr * scale}
                                          for p, (_, scale) in zip(self.params, groups)], args)
        if args.compile:
            self._losses, self._logits = compiled(self._losses, self.device), compiled(self._logits, self.device)
        # optimiser state exists from here on and is zeroed by reset(): a zeroed SGD momentum or Adam
        # state is what a fresh optimiser starts from, and the tensors stay where a capture finds them
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.reset()

    def _flat_forward(self, model, trainable, groups, args):
        """losses(views, masks), logits(images) and predict(images, masks) of the model with row k of the
        flat weights (of each group of names) for image k."""
        sizes = [[trainable[n].numel() for n in names] for names in groups]

        def weights(rows, prefix=''):
            """{name: weight} of one image's rows (one per group), named as the functional call below
            names them"""
            return {prefix + n: w.view(trainable[n].shape) for names, row, size in zip(groups, rows, sizes)
                    for n, w in zip(names, row.split(size))}
        self.weights = weights
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        fixed.update(dict(model.named_buffers()))
        # the graphs of --compile read these where they are: without the mark, CUDA graphs copy every
        # frozen weight and buffer (decoder, head) into the graph's own memory on every replay
        for tensor in fixed.values():
            torch._dynamo.mark_static_address(tensor)
        if self.device.type == 'cpu' and (self.k > 1 or args.compile):
            # timm's explicit attention: vmap has no batching rule for the CPU's fused kernel, and for
            # sequences this short (17 and 65 tokens for the example) the explicit products compile faster
            for m in model.modules():
                if hasattr(m, 'fused_attn'):
                    m.fused_attn = False

        methods = NamedOutputs(model)
        fixed = {f'model.{n}': t for n, t in fixed.items()}

        def call(rows, method, *inputs):
            return torch.func.functional_call(methods, (self.weights(rows, 'model.'), fixed), (method, *inputs))

        def loss(rows, views, masks):
            return call(rows, 'mae_loss', views, args.mask_ratio, masks)

        def logits(rows, image):
            return call(rows, 'logits', image)[0]

        def predict(rows, image, mask):
            return call(rows, 'reconstruct', image, args.mask_ratio, mask)[0]

        adapted, classified = tuple(self.params), tuple(self.ema or self.params)
        if self.k == 1:
            first = lambda flats: tuple(flat[0] for flat in flats)
            return (lambda views, masks: loss(first(adapted), views[0], masks[0]).unsqueeze(0),
                    lambda images: logits(first(classified), images[0]).unsqueeze(0),
                    lambda images, masks: predict(first(adapted), images[0], masks[0]).unsqueeze(0))
        batched = [torch.func.vmap(f) for f in (loss, logits, predict)]
        return (lambda views, masks: batched[0](adapted, views, masks),
                lambda images: batched[1](classified, images),
                lambda images, masks: batched[2](adapted, images, masks))

    def state(self):
        """The adaptation state as a list of tensors, the weights first (and their average, --online_ema),
        then the optimiser's state, then (fp16) the loss scale and its growth count; online runs save it
        with their results, and load_state() puts it back in place."""
        tensors = [p.detach() for p in self.params + self.ema] + [v for state in self.optimizer.state.values()
                                                       for v in state.values() if torch.is_tensor(v)]
        if self.scaler.is_enabled():
            tensors.append(torch.tensor([self.scaler.get_scale(), self.scaler._get_growth_tracker()],
                                        dtype=torch.float64))
        return tensors

    def load_state(self, tensors):
        tensors = list(tensors)
        if self.scaler.is_enabled():
            scale, growth = tensors.pop().tolist()
            self.scaler.load_state_dict({**self.scaler_start, 'scale': scale, '_growth_tracker': int(growth)})
        with torch.no_grad():
            torch._foreach_copy_(self.state()[:len(tensors)], tensors)

    @torch.no_grad()
    def reconstruct(self, images, masks):
        """The decoder's predictions (K, L, p*p*3) for images (K, 1, 3, H, W) with shuffle orders (K, 1, L)."""
        with self._autocast():
            return self._predict(images, masks).float()

    def reset(self, weights=True, optimizer=True):
        """Back to the start weights and/or a fresh optimiser state, in place."""
        with torch.no_grad():
            if weights:
                torch._foreach_copy_(self.params, self.start)
                if self.ema:
                    torch._foreach_copy_(self.ema, self.start)
            if optimizer:
                for state in self.optimizer.state.values():
                    for value in state.values():
                        if torch.is_tensor(value):
                            value.zero_()
                self.scaler.load_state_dict(self.scaler_start)
        self.optimizer.zero_grad(set_to_none=False)

    @torch.no_grad()
    def restore(self, indices, step):
        """Stochastic restore (online): each adapted weight of image k back to its loaded value with
        probability --online_restore, drawn from (seed, image index, step) so that a resumed stream
        draws the same."""
        sizes = [p.shape[1] for p in self.params]
        for row, index in enumerate(indices):
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.args.seed, index, 4, step))
            back = torch.rand(sum(sizes), generator=gen, device=self.device) < self.args.online_restore
            for p, start, keep in zip(self.params, self.start, back.split(sizes)):
                p[row] = torch.where(keep, start[row], p[row])

    @torch.no_grad()
    def update_average(self):
        """--online_ema: the classifying weights move toward the adapted ones, ema = m ema + (1 - m) w."""
        torch._foreach_lerp_(self.ema, self.params, 1 - self.args.online_ema)

    @torch.no_grad()
    def distance_from_start(self):
        """Each image's distance of the adapted weights from the loaded ones, ||w - w0|| (host floats)."""
        return self._row_norms([p - start for p, start in zip(self.params, self.start)]).tolist()

    @staticmethod
    def _row_norms(flats):
        """The L2 norm (K,) of each image's part of one or more (K, N) tensors."""
        norms = [torch.linalg.vector_norm(flat, dim=1) for flat in flats]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def classify(self, images, labels):
        """images (K, 1, 3, H, W), labels (K,) -> top-1 predictions (K,) and cross-entropies (K,)."""
        if self.switch_modes:
            self.model.eval()
        with self._autocast():
            logits = self._logits(images)
        if self.switch_modes:
            self.model.train()
        return predictions(logits, labels, self.class_subset)

    def step(self, views, masks):
        """One optimiser step of every image from views (A, K, B, 3, H, W) and shuffle orders
        (A, K, B, L) of A = accum_iter micro-batches; returns each image's reconstruction loss (K,)."""
        total = 0.
        for micro in range(len(views)):
            with self._autocast():
                losses = self._losses(views[micro], masks[micro]).float() / len(views)
            objective = losses.sum()
            if self.args.online_anchor:  # online: a pull toward the loaded weights, once per step
                objective = objective + self.args.online_anchor / (2 * len(views)) * \
                    sum((p - start).square().sum() for p, start in zip(self.params, self.start))
            self.scaler.scale(objective).backward()
            total = total + losses.detach()
        if self.args.clip_grad:  # per image, as torch.nn.utils.clip_grad_norm_ over its weights
            self.scaler.unscale_(self.optimizer)
            with torch.no_grad():
                factor = (self.args.clip_grad / (self._row_norms([p.grad for p in self.params]) + 1e-6)).clamp(max=1)
                for p in self.params:
                    p.grad.mul_(factor[:, None])
        self.scaler.step(self.optimizer)  # flat tensors: a few fused passes, left eager
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=False)  # the gradients stay where a graph finds them
        return total

    def masks(self, indices):
        """Shuffle orders (steps, A, K, B, L) of every image, each drawn from (seed, image index)."""
        args, orders = self.args, []
        for index in indices:
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(args.seed, index, 1))
            noise = torch.rand(args.steps_per_example, args.accum_iter, args.batch_size, self.num_patches,
                               generator=gen, device=self.device)
            orders.append(noise.argsort(dim=-1))
        return torch.stack(orders, dim=2)

    def adapt(self, indices, labels, images, raws=None, windows=None, reset_weights=True, reset_optimizer=True,
              observe=None):
        """Adapt to K images. labels (K,), images (K, 1, 3, H, W) on the device, raws: their decoded uint8
        images (random-crop views only). Episodic (the default) starts from the start weights and a fresh
        optimiser state; online runs pass reset_weights=False (and reset_optimizer as asked), and windows:
        per image, the (eval crop, decoded image) pairs its views are drawn from. observe(step, trainer,
        images, cross-entropies) is called after each classification (step 0, before the first step, to
        the last).

        Returns, per image, predictions and cross-entropies before and after each step (steps + 1,) and
        reconstruction losses (steps,). Fewer than K images (the last group of a run) are padded with
        copies of the last one."""
        n, pad = len(indices), self.k - len(indices)
        if pad:
            indices, labels = list(indices) + [indices[-1]] * pad, torch.cat([labels, labels[-1:].expand(pad)])
            images = torch.cat([images, images[-1:].expand(pad, -1, -1, -1, -1)])
            raws = None if raws is None else list(raws) + [raws[-1]] * pad
        sources = windows or [[(image, raw)] for image, raw in zip(images, raws or [None] * len(images))]
        self.reset(reset_weights, reset_optimizer)
        masks = self.masks(indices)
        crop_gens = [torch.Generator().manual_seed(derive_seed(self.args.seed, i, 2)) for i in indices]
        pred, ce = self.classify(images, labels)
        preds, ces, losses = [pred], [ce], []
        if observe:
            observe(0, self, images, ce)
        for step in range(self.args.steps_per_example):
            losses.append(self.step(training_views(images, sources, crop_gens, self.args), masks[step]))
            if self.args.online_restore:
                self.restore(indices, step)
            if self.ema:
                self.update_average()
            pred, ce = self.classify(images, labels)
            preds.append(pred)
            ces.append(ce)
            if observe:
                observe(step + 1, self, images, ce)
        # one host sync per group of images
        preds, ces = torch.stack(preds, 1).cpu().numpy(), torch.stack(ces, 1).cpu().numpy()
        losses = torch.stack(losses, 1).cpu().numpy() if losses else np.zeros((len(indices), 0), np.float32)
        return list(zip(preds, ces, losses))[:n]


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


def groups_of(iterable, size):
    group = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def run_test_time_training(trainer, loader, store, args, log_writer=None, online=None, observe=None):
    """Adapt to every image the loader yields, K at a time; records go to `store`, flushed every
    args.flush_every images and on a stop signal, so that nothing finished is lost.

    online: the OnlineStream of online TTT-MAE (K = 1, util/online.py), or None (episodic): the weights
    carry over, each image's views come from the stream's window, and the stream's state is saved before
    each flush of the results it goes with. Episodic runs also flush on an error; an online run does not
    (the state is then mid-image), so its rerun redoes the images since the last flush.
    observe(indices): for a group's image indices, an observer for adapt() or None (reconstructions).
    Returns the number of images done."""
    device, done, correct_last = trainer.device, 0, 0
    progress = ProgressLine(len(loader), args.print_freq)

    def flush():
        if online is not None:
            online.save(done, trainer)
        store.flush()
        if online is not None:
            online.prune(done)
        distributed.raise_if_another_failed()  # with what is done saved

    with StopRequested() as stop:
        try:
            for group in groups_of(loader, trainer.k):
                start = time.time()
                indices = [item['index'] for item in group]
                labels = torch.tensor([item['label'] for item in group], device=device)
                images = torch.stack([item['image'] for item in group]).to(device, non_blocking=True).unsqueeze(1)
                raws = None if args.single_crop else [item['raw'].to(device, non_blocking=True) for item in group]
                windows = None if online is None else [online.sources(images[0], None if raws is None else raws[0])]
                results = trainer.adapt(indices, labels, images, raws, windows=windows,
                                        reset_weights=online is None or online.resets_weights(done),
                                        reset_optimizer=online is None or online.reset_optimizer,
                                        observe=observe and observe(indices))
                drift = {} if online is None else {'position': online.position + done,
                                                   'weight_distance': trainer.distance_from_start()[0]}
                seconds = (time.time() - start) / len(group)
                for item, (preds, ces, mae_losses) in zip(group, results):
                    if not np.all(np.isfinite(mae_losses)):
                        path = loader.dataset.samples[item['index']][0]
                        raise UserError(f"non-finite reconstruction loss on image {item['index']} ({path}); "
                                        f"stopping, the images before it are kept in {args.output_dir}")
                    store.add(index=item['index'], label=item['label'], pred=preds, ce_loss=ces,
                              mae_loss=mae_losses, seconds=seconds, **drift)
                    done += 1
                    correct_last += int(preds[-1] == item['label'])
                    if done % args.flush_every == 0:
                        flush()
                    accuracy = 100 * correct_last / done
                    if progress.update(done, f"accuracy after {args.steps_per_example} steps {accuracy:.2f}%") \
                            and log_writer is not None:
                        log_writer.add_scalar('ttt/running_accuracy_last_step', accuracy, done)
                if stop.signal is not None:
                    break
        except BaseException as e:
            # after a stop signal the loader's workers (sent the same signal by Ctrl-C or scancel) end, and
            # the loader raises between images: that is the stop, not an error
            if stop.signal is None or not isinstance(e, Exception):
                if online is None:
                    store.flush()
                raise
        flush()
    if stop.signal is not None:
        print(f"stopped by signal {stop.signal}; {done} images saved, rerun the same command to continue",
              flush=True)
        raise SystemExit(128 + stop.signal)
    return done


@torch.no_grad()
def run_baseline(model, loader, store, device, args, class_subset=None):
    """Classify batches of eval crops without adaptation; one record per image. Returns the count."""
    model.eval()
    device, amp_dtype = torch.device(device), AMP_DTYPES[args.amp]
    class_subset = None if class_subset is None else torch.as_tensor(class_subset)
    done, progress = 0, ProgressLine(len(loader.dataset), args.print_freq * loader.batch_size)
    try:
        for batch in loader:
            images = batch['image'].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model.logits(images)
            preds, ces = (x.numpy() for x in predictions(logits.cpu(), batch['label'], class_subset))
            for i, index in enumerate(batch['index'].tolist()):
                store.add(index=index, label=int(batch['label'][i]), pred=preds[i:i + 1], ce_loss=ces[i:i + 1],
                          mae_loss=np.zeros(0, np.float32), seconds=0.)
            done += len(preds)
            store.flush()
            progress.update(done)
    finally:
        store.flush()
    return done
