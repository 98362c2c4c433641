"""Test-time training (SPEC section 5) and the no-adaptation baseline (section 6).

For each image: reset the weights to the start weights, take `steps_per_example` optimiser steps on
the masked-reconstruction loss of views of that image alone, and classify its eval crop before the
first step and after every step. Randomness comes from (seed, image index) only, so results do not
depend on the number of processes or on resumption.
"""
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F

from util.checkpoint import HEAD_PREFIXES
from util.cli import UserError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_rgb
from util.seed import derive_seed

FINETUNE_MODES = ('encoder', 'all', 'encoder_no_cls_no_msk')
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def set_precision(device, strict_fp32):
    """TF32 on CUDA as the released PyTorch 1.11 ran it, unless strict fp32 is asked for."""
    if torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = not strict_fp32
        torch.backends.cudnn.allow_tf32 = not strict_fp32


def trainable_parameters(model, finetune_mode):
    """The parameters adapted at test time; everything else is frozen.

    The head never receives a gradient from the reconstruction loss, so it is frozen outright
    (the same result, less memory); the sin-cos tables are fixed.
    """
    if finetune_mode not in FINETUNE_MODES:
        raise UserError(f"unknown --finetune_mode {finetune_mode!r}; choices: {', '.join(FINETUNE_MODES)}")
    chosen = []
    for name, p in model.named_parameters():
        train = not name.endswith('pos_embed') and not name.startswith(HEAD_PREFIXES)
        if finetune_mode in ('encoder', 'encoder_no_cls_no_msk'):
            train = train and not name.startswith('decoder')
        if finetune_mode == 'encoder_no_cls_no_msk':
            train = train and name not in ('cls_token', 'mask_token')
        p.requires_grad_(train)
        if train:
            chosen.append(p)
    return chosen


def build_optimizer(params, args, foreach=True):
    # foreach: one call per update for all weights (on CPU a C++ loop over the same per-tensor kernels,
    # so less Python per step), bitwise the per-parameter loop (tested); torch's default on CUDA already.
    if args.optimizer_type == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.optimizer_momentum, foreach=foreach)
    if args.optimizer_type == 'adam':
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.95), foreach=foreach)
    if args.optimizer_type == 'adam_w':
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                 foreach=foreach)
    raise UserError(f"unknown --optimizer_type {args.optimizer_type!r}; choices: sgd, adam, adam_w")


def random_resized_crops(image, n, size, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """n views of a uint8 (3, H, W) image on the device, each RandomResizedCrop(size, bicubic) + flip,
    normalised. Crop parameters are drawn as torchvision draws them, from `generator` (CPU)."""
    from torchvision.transforms.v2 import functional as TF
    _, height, width = image.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    views = []
    for _ in range(n):
        for _attempt in range(10):
            target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
                left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
                break
        else:  # fall back to a central crop of the nearest allowed aspect ratio, as torchvision does
            if width / height < ratio[0]:
                w, h = width, int(round(width / ratio[0]))
            elif width / height > ratio[1]:
                w, h = int(round(height * ratio[1])), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        view = TF.resized_crop(image, top, left, h, w, [size, size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            view = view.flip(-1)
        views.append(view)
    views = torch.stack(views).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return (views - mean) / std


class TestTimeDataset(torch.utils.data.Dataset):
    """Item k = image indices[k], decoded once: its eval crop (normalised), and the raw uint8
    image when random-crop views are to be made from it."""

    def __init__(self, samples, indices, input_size, raw=False):
        self.samples, self.indices, self.raw = samples, list(indices), raw
        self.transform = eval_transform(input_size)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.samples[index]
        image = load_rgb(path)
        raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) if self.raw else torch.empty(0)
        return index, label, self.transform(image), raw


def mode_dependent_modules(model):
    """Modules outside the head that compute differently in train and eval mode."""
    from timm.layers import DropPath
    found = []
    for name, m in model.named_modules():
        if name.split('.')[0] in ('head', 'bn') or name.startswith('classifier'):
            continue
        if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or (isinstance(m, torch.nn.Dropout) and m.p > 0)
                or (isinstance(m, DropPath) and m.drop_prob > 0)):
            found.append(name)
    return found


class TestTimeTrainer:
    """Adapts a model to one image at a time, resetting it in place from start weights on the device.

    The released loop puts the model in train mode for the reconstruction steps and in eval mode to
    classify. When no module outside the head depends on the mode (the MAE ViTs: no dropout, drop
    path or batch norm there), the model simply stays in eval mode: the same function, without two
    walks over the module tree per step.
    """

    def __init__(self, model, args, device):
        self.model, self.args, self.device = model, args, torch.device(device)
        self.switch_modes = bool(mode_dependent_modules(model))
        model.eval()
        self.params = trainable_parameters(model, args.finetune_mode)
        self.start_params = [p.detach().clone() for p in self.params]
        self.optimizer = build_optimizer(self.params, args)
        self.num_patches = model.patch_embed.num_patches
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.forward = torch.compile(model) if args.compile else model

    group_size = 1

    def adapt_group(self, items):
        """items: (index, label, eval image (1, 3, H, W), raw image or None) on the device."""
        return [self.adapt(*item) for item in items]

    def reset(self):
        """Start weights and a fresh optimiser state (what a newly built optimiser would hold)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.start_params)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_mode(self, training):
        if self.switch_modes:
            self.model.train(training)

    @torch.no_grad()
    def classify(self, eval_image, label):
        self.train_mode(False)
        with self._autocast():
            _, _, _, logits = self.forward(eval_image, mask_ratio=0, reconstruct=False)
        self.train_mode(True)
        logits = logits.float()
        return logits.argmax(dim=1)[0], F.cross_entropy(logits, label.view(1))

    def masks(self, index):
        """Per-view shuffle orders for every micro-batch of every step, from (seed, index)."""
        args = self.args
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(args.seed, index, 1))
        noise = torch.rand(args.steps_per_example, args.accum_iter, args.batch_size, self.num_patches,
                           generator=gen, device=self.device)
        return noise.argsort(dim=-1)

    def adapt(self, index, label, eval_image, raw_image=None):
        """Returns predictions (steps+1,), cross-entropies (steps+1,) and MAE losses (steps,)."""
        args = self.args
        self.reset()
        label = torch.as_tensor(label, device=self.device)
        masks = self.masks(index)
        crop_gen = torch.Generator().manual_seed(derive_seed(args.seed, index, 2))
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        pred, ce = self.classify(eval_image, label)
        preds, ces, mae_losses = [pred], [ce], []
        for step in range(args.steps_per_example):
            step_loss = 0.
            for micro in range(args.accum_iter):
                if raw_image is None:  # --single_crop: every view is the eval crop
                    views = eval_image.expand(args.batch_size, -1, -1, -1)
                else:
                    views = random_resized_crops(raw_image, args.batch_size, eval_image.shape[-1], crop_gen)
                with self._autocast():
                    loss_dict, _, _, _ = self.forward(views, mask_ratio=args.mask_ratio,
                                                      input_mask=masks[step, micro])
                loss = loss_dict['mae'] / args.accum_iter
                scaler.scale(loss).backward()
                step_loss = step_loss + loss.detach().float()
            scaler.step(self.optimizer)
            scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            mae_losses.append(step_loss)
            pred, ce = self.classify(eval_image, label)
            preds.append(pred)
            ces.append(ce)
        # one host sync per image
        return (torch.stack(preds).cpu().numpy(), torch.stack(ces).cpu().numpy(),
                torch.stack(mae_losses).cpu().numpy() if mae_losses else np.zeros(0, np.float32))


class BatchedTestTimeTrainer(TestTimeTrainer):
    """Adapts `parallel_images` images at once as independent weight sets (torch.func.vmap over
    stacked copies of the trainable weights), for models too small to fill the device with one
    image. SGD with momentum, written out as torch.optim.SGD computes it; per-image results equal
    one-at-a-time up to floating-point reassociation in the batched matrix products."""

    def __init__(self, model, args, device):
        super().__init__(model, args, device)
        if args.optimizer_type != 'sgd' or args.amp == 'fp16' or args.compile:
            raise UserError("--parallel_images > 1 supports --optimizer_type sgd only, "
                            "without --amp fp16 (no loss scaling there) or --compile")
        self.group_size = args.parallel_images
        trainable = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in trainable]
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if id(p) not in trainable}
        self.fixed.update(dict(model.named_buffers()))

        def mae_loss(params, views, mask):
            with self._autocast():
                loss = torch.func.functional_call(model, (params, self.fixed), (views,),
                                                  {'mask_ratio': args.mask_ratio, 'input_mask': mask})[0]['mae']
            return loss.float() / args.accum_iter

        def logits(params, image):
            with self._autocast():
                return torch.func.functional_call(model, (params, self.fixed), (image,),
                                                  {'mask_ratio': 0, 'reconstruct': False})[3].float()
        self.grad_and_loss = torch.func.vmap(torch.func.grad_and_value(mae_loss))
        self.logits = torch.func.vmap(logits)

    def classify_all(self, params, images, labels):
        self.train_mode(False)
        with torch.no_grad():
            logits = self.logits(params, images)[:, 0]
        self.train_mode(True)
        return logits.argmax(dim=1), F.cross_entropy(logits, labels, reduction='none')

    def adapt_group(self, items):
        args, k = self.args, len(items)
        params = {n: p.unsqueeze(0).repeat(k, *[1] * p.dim()) for n, p in zip(self.names, self.start_params)}
        momentum = {}
        labels = torch.tensor([label for _, label, _, _ in items], device=self.device)
        images = torch.stack([image for _, _, image, _ in items])  # (k, 1, 3, H, W)
        masks = torch.stack([self.masks(index) for index, _, _, _ in items])
        crop_gens = [torch.Generator().manual_seed(derive_seed(args.seed, index, 2)) for index, _, _, _ in items]
        preds, ces = self.classify_all(params, images, labels)
        preds, ces, mae_losses = [preds], [ces], []
        for step in range(args.steps_per_example):
            grads, step_loss = None, 0.
            for micro in range(args.accum_iter):
                if items[0][3] is None:
                    views = images.expand(-1, args.batch_size, -1, -1, -1)
                else:
                    views = torch.stack([random_resized_crops(raw, args.batch_size, images.shape[-1], gen)
                                         for (_, _, _, raw), gen in zip(items, crop_gens)])
                g, loss = self.grad_and_loss(params, views, masks[:, step, micro])
                grads = g if grads is None else {n: grads[n] + g[n] for n in grads}
                step_loss = step_loss + loss.detach()
            with torch.no_grad():
                for n in self.names:
                    momentum[n] = grads[n] if step == 0 else momentum[n].mul_(args.optimizer_momentum).add_(grads[n])
                    params[n] = params[n].sub_(momentum[n], alpha=args.lr)
            mae_losses.append(step_loss)
            pred, ce = self.classify_all(params, images, labels)
            preds.append(pred)
            ces.append(ce)
        preds = torch.stack(preds, 1).cpu().numpy()
        ces = torch.stack(ces, 1).cpu().numpy()
        mae_losses = (torch.stack(mae_losses, 1).cpu().numpy() if mae_losses
                      else np.zeros((k, 0), np.float32))
        return list(zip(preds, ces, mae_losses))


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag checked between images, so results are flushed first;
    the previous handlers come back when the block ends."""

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.signal = signum


def groups_of(iterable, size):
    group = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def run_test_time_training(trainer, loader, store, args, log_writer=None):
    """Adapt to every image the loader yields; records go to `store`, flushed every args.flush_every
    images, on a stop signal and on any error, so that nothing finished is lost. Returns the count."""
    with StopRequested() as stop:
        try:
            done = _adapt_all(trainer, loader, store, args, log_writer, stop)
        finally:
            store.flush()
    if stop.signal is not None:
        print(f"stopped by signal {stop.signal}; {done} images saved, rerun the same command to continue",
              flush=True)
        raise SystemExit(128 + stop.signal)
    return done


def _adapt_all(trainer, loader, store, args, log_writer, stop):
    done, correct_last, start = 0, 0, time.time()
    for group in groups_of(loader, trainer.group_size):
        t0 = time.time()
        group = [(index, label, eval_image.to(trainer.device, non_blocking=True).unsqueeze(0),
                  raw.to(trainer.device, non_blocking=True) if raw.numel() else None)
                 for index, label, eval_image, raw in group]
        results = trainer.adapt_group(group)
        seconds = (time.time() - t0) / len(group)
        for (index, label, _, _), (preds, ces, mae_losses) in zip(group, results):
            if not np.all(np.isfinite(mae_losses)):
                path = loader.dataset.samples[index][0]
                raise UserError(f"non-finite reconstruction loss on image {index} ({path}); "
                                f"stopping, {done} images of this run kept in {args.output_dir}")
            store.add(index=index, label=label, pred=preds, ce_loss=ces, mae_loss=mae_losses, seconds=seconds)
            done += 1
            correct_last += int(preds[-1] == label)
            if done % args.flush_every == 0:
                store.flush()
            if done % args.print_freq == 0 or done == len(loader):
                print(f"[{done}/{len(loader)}] accuracy after {args.steps_per_example} steps "
                      f"{100 * correct_last / done:.2f}%  ({done / (time.time() - start):.2f} images/s)", flush=True)
                if log_writer is not None:
                    log_writer.add_scalar('ttt/running_accuracy_last_step', 100 * correct_last / done, done)
        if stop.signal is not None:
            break
    return done


@torch.no_grad()
def run_baseline(model, loader, store, device, amp_dtype=None):
    """Classify batches of eval crops without adaptation; one record per image."""
    model.eval()
    device = torch.device(device)
    done = 0
    try:
        for indices, labels, images, _ in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, _, _, logits = model(images, mask_ratio=0, reconstruct=False)
            logits = logits.float().cpu()
            preds = logits.argmax(dim=1).numpy()
            ces = F.cross_entropy(logits, labels, reduction='none').numpy()
            for i, index in enumerate(indices.tolist()):
                store.add(index=index, label=int(labels[i]), pred=preds[i:i + 1], ce_loss=ces[i:i + 1],
                          mae_loss=np.zeros(0, np.float32), seconds=0.)
            done += len(indices)
            store.flush()
    finally:
        store.flush()
    return done


def summarize(records, num_expected):
    """Per-step accuracy (percent) and mean losses over the records."""
    correct = records['pred'] == records['label'][:, None]
    return {
        'num_images': int(len(records['index'])),
        'num_images_expected': int(num_expected),
        'complete': bool(len(records['index']) == num_expected),
        'accuracy_per_step': (100 * correct.mean(axis=0)).tolist(),
        'cross_entropy_per_step': records['ce_loss'].mean(axis=0).tolist(),
        'mae_loss_per_step': records['mae_loss'].mean(axis=0).tolist() if records['mae_loss'].size else [],
    }


# ---- set-up and outputs shared by main_test_time_training.py and test_without_adaptation.py ----

def add_test_time_args(parser):
    """Flags both test-time scripts take: checkpoints, the image selection, precision."""
    group = parser.add_argument_group('test time')
    group.add_argument('--resume_model', required=True, help='MAE checkpoint (encoder + decoder)')
    group.add_argument('--resume_finetune', required=True, help='probe checkpoint (classification head)')
    group.add_argument('--dataset_name', default='imagenet_c',
                       help="'imagenet*' requires class folders named by ImageNet wnids (standard labels); "
                            "any other name labels sorted folders 0..K-1 unless they are wnids")
    group.add_argument('--max_examples', default=None, type=int, help='evaluate only this many images')
    group.add_argument('--subset', default='stride', choices=['stride', 'random', 'first'],
                       help='which --max_examples images: evenly spaced, random (--subset_seed) or first')
    group.add_argument('--subset_seed', default=0, type=int)
    group.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'],
                       help='autocast precision (default none: fp32, TF32 matmuls on CUDA as released)')
    group.add_argument('--strict_fp32', action='store_true', help='on CUDA, disable TF32 (full fp32 matmuls)')
    group.add_argument('--num_workers', default=4, type=int, help='image decoding processes')
    group.add_argument('--flush_every', default=10, type=int, help='save results every N images')
    group.add_argument('--print_freq', default=50, type=int)


# flags that do not change per-image results: a rerun may change them and still continue
RUN_ONLY_ARGS = {'output_dir', 'log_dir', 'device', 'num_workers', 'pin_mem', 'world_size', 'local_rank',
                 'rank', 'gpu', 'distributed', 'dist_url', 'flush_every', 'print_freq',
                 'data_path', 'resume_model', 'resume_finetune'}


def run_config(args):
    config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS}
    config.update(data=os.path.abspath(args.data_path), resume_model=os.path.basename(args.resume_model),
                  resume_finetune=os.path.basename(args.resume_finetune),
                  device_type=torch.device(args.device).type)  # CPU and CUDA generators draw other masks
    return config


def build_test_model(args, device):
    """The model of SPEC section 2: MAE checkpoint + probe head, loaded strictly."""
    from models_mae import build_model
    from util.checkpoint import combined_state_dict, load_state_dict_strict
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes)
    args.input_size = model.patch_embed.img_size[0]
    state = combined_state_dict(args.resume_model, args.resume_finetune, args.head_type)
    load_state_dict_strict(model, state, f"{args.resume_model} + {args.resume_finetune}")
    return model.to(device)


def load_test_set(args):
    from util.datasets import ImageFolder
    imagenet = True if args.dataset_name.lower().startswith('imagenet') else None
    dataset = ImageFolder(args.data_path, imagenet_labels=imagenet)
    if len(dataset) == 0:
        raise UserError(f"no images in {args.data_path}")
    largest = max(dataset.class_to_idx.values())
    if largest >= args.num_classes:
        raise UserError(f"label {largest} of {args.data_path} does not fit --num_classes {args.num_classes}")
    return dataset


def prepare_run(args):
    """Shared start of both scripts: processes, precision, data, model, and this process's images.

    Returns (device, dataset, indices, model, store, todo); todo is None when the run is finished.
    """
    from util import distributed
    from util.results import ResultStore, check_run_config, select_indices
    if not args.output_dir:
        raise UserError("--output_dir is required: results are saved there")
    if args.flush_every < 1 or args.print_freq < 1 or (args.max_examples is not None and args.max_examples < 1):
        raise UserError("--flush_every, --print_freq and --max_examples must be at least 1")
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    set_precision(device, args.strict_fp32)
    dataset = load_test_set(args)
    indices = select_indices(len(dataset), args.max_examples, args.subset, args.subset_seed)
    model = build_test_model(args, device)
    os.makedirs(args.output_dir, exist_ok=True)
    store = ResultStore(args.output_dir, args.rank)
    check_run_config(store, run_config(args), distributed.is_main_process())
    # rank 0 decides what is left and tells the others, so all shard the same list
    todo = [images_to_do(store, indices) if distributed.is_main_process() else None]
    distributed.broadcast_object(todo)
    todo = todo[0]
    return device, dataset, indices, model, store, None if todo is None else todo[args.rank::args.world_size]


def images_to_do(store, indices):
    """The selected images not finished yet, or None when the run is complete and written."""
    done = store.done_indices()
    todo = [int(i) for i in indices if int(i) not in done]
    results = os.path.join(store.output_dir, 'results.json')
    if not todo and os.path.exists(results):
        with open(results) as f:
            if json.load(f).get('complete'):
                print(f"all {len(indices)} images already done: results in {store.output_dir}")
                return None
    print(f"{len(indices)} images selected, {len(indices) - len(todo)} already done, {len(todo)} to do")
    return todo


def write_outputs(args, store, dataset, indices, method, wall_time_s, images_this_run):
    """Merge every process's records and write the released files plus results.json."""
    from util.io import atomic_open, write_json, write_text
    records = store.load()
    summary = summarize(records, len(indices))
    if summary['complete']:
        records['filename'] = np.array([os.path.relpath(dataset.samples[i][0], args.data_path)
                                    for i in records['index']])
        store.finalize(records)
    steps = summary['accuracy_per_step']
    args_line = str(args)
    if method == 'baseline':
        write_text(os.path.join(args.output_dir, 'accuracy.txt'),
                   f"{args_line}\n{steps[0]} {summary['cross_entropy_per_step'][0]}\n")
        with atomic_open(os.path.join(args.output_dir, 'accuracy.npy'), 'wb') as f:
            np.save(f, (records['pred'][:, 0] == records['label']).astype(np.float64))
    else:
        # released numbering: line i is the accuracy after i + 1 steps (step 0 is in results.json)
        write_text(os.path.join(args.output_dir, 'accuracy.txt'),
                   args_line + '\n' + ''.join(f"{i}\t{a}\n" for i, a in enumerate(steps[1:])))
    result = {'method': method, 'data_path': os.path.abspath(args.data_path), **summary,
              'steps_per_example': getattr(args, 'steps_per_example', 0),
              'wall_time_s': wall_time_s,
              'images_per_s': images_this_run / wall_time_s if wall_time_s > 0 else None,
              'seconds_per_image': float(records['seconds'].mean()) if method == 'ttt' else None,
              'checkpoints': {'resume_model': os.path.basename(args.resume_model),
                              'resume_finetune': os.path.basename(args.resume_finetune)},
              'args': json.loads(json.dumps(vars(args), default=str))}
    if method == 'baseline':
        result.update(accuracy=steps[0], loss=summary['cross_entropy_per_step'][0])
    write_json(os.path.join(args.output_dir, 'results.json'), result)
    print(f"{method}: {summary['num_images']}/{len(indices)} images, accuracy per step: "
          + ' '.join(f"{a:.2f}" for a in steps))
    return result

