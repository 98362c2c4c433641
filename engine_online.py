"""Online TTT-MAE (docs/online.md): the paper's trainer with the weights carried from image to image over a
stream, each step's views drawn from a window of the latest images, and the remedies against drift
(OnlineTrainer, each method one hook of engine_test_time.TestTimeTrainer); and the stream as a run over a
folder sees it (Online, the protocol main_online_ttt.py gives engine_run.test_time_training): its order,
each process's share, where a rerun continues, what results.json adds. The stream's files and order are
util/streams.py's."""
import contextlib
import os
import shutil
from collections import deque

import torch

from engine_test_time import ModelCall, TestTimeTrainer
from util.objectives import Objective
from util.datasets import random_resized_crops
from util.errors import UserError
from util.seed import Stream, derive_seed
from util.streams import StreamState, drift, process_share, stream_order, stream_position


def lr_groups(names, encoder_lr_scale, decoder_side):
    """[(names, lr scale)] of the adapted weights: one group, or with --encoder_lr_scale the encoder's
    weights and then the decoder side's (what only the reconstruction reads, the model's parts())."""
    if encoder_lr_scale == 1:
        return [(list(names), 1.)]
    encoder = [n for n in names if not n.startswith(decoder_side)]
    rest = [n for n in names if n not in encoder]
    return [(group, scale) for group, scale in ((encoder, encoder_lr_scale), (rest, 1.)) if group]


def window_views(window, crops, args):
    """A step's views (accum_iter, batch_size, 3, H, W) spread evenly over the window's (eval crop, decoded
    image) pairs, the newest taking the remainder: their eval crops with --single_crop, else random resized
    crops of each, cut with the current image's crop generator."""
    b, n = args.batch_size, len(window)
    counts = [b // n + (j >= n - b % n) for j in range(n)]
    micro = []
    for _ in range(args.accum_iter):
        if args.single_crop:
            parts = [image.expand(c, -1, -1, -1) for (image, _), c in zip(window, counts) if c]
        else:
            parts = [random_resized_crops(raw, c, window[-1][0].shape[-1], crops) for (_, raw), c in zip(window, counts)
                     if c]
        micro.append(torch.cat(parts))
    return torch.stack(micro)


class OnlineTrainer(TestTimeTrainer):
    """TestTimeTrainer whose weights carry over from one image of the stream to the next, each step's views
    spread over the last --online_window images, with: --online_reset_every (back to the loaded weights
    every N images), --online_keep_optimizer (carry the optimiser state too), --encoder_lr_scale,
    --clip_grad, --online_anchor (a pull toward the loaded weights), --online_restore (stochastic restore)
    and --online_ema (classify with an average of the adapted weights). Each image records its place in
    the stream and how far the weights are from the loaded ones; state_files (util/streams.StreamState),
    if given, keeps the stream's state with the results."""

    def __init__(self, model, args, device, class_subset=None, state_files=None):
        super().__init__(model, args, device, class_subset)
        if args.online_window > 1 and type(self.objective).views is not Objective.views:
            raise UserError(f"--objective {args.objective} draws its own views of the current image: pass "
                            f"--online_window 1")
        self.images = 0  # images of the stream begun
        self.window = deque(maxlen=args.online_window)  # the latest (eval crop, decoded image) pairs
        self.state_files, self.saved_at = state_files, None  # the images its last saved state had begun
        # --online_ema: the weights that classify, an average of the adapted ones
        self.average = {name: w.clone() for name, w in self.start.items()} if args.online_ema else None

    def param_groups(self):
        return [{'params': [self.params[n] for n in names], 'lr': self.args.lr * scale}
                for names, scale in lr_groups(self.params, self.args.encoder_lr_scale, self.model.parts().decoder_side)]

    def adapt_image(self, index, label, image, raw=None, observe=None):
        self.window.append((image, raw))
        position = self.images
        records = super().adapt_image(index, label, image, raw, observe)
        return {**records, 'position': position, 'weight_distance': self.distance_from_start()}

    @torch.no_grad()
    def begin_image(self):
        every = self.args.online_reset_every
        back = bool(every) and self.images % every == 0
        self.reset(weights=back, optimizer=not self.args.online_keep_optimizer)
        if back and self.average is not None:
            for name, w in self.average.items():
                w.copy_(self.start[name])
        self.images += 1

    def views(self, image, raw, crops):
        if len(self.window) == 1:
            return super().views(image, raw, crops)
        return window_views(self.window, crops, self.args)

    def total(self, losses):
        total = super().total(losses)
        if self.args.online_anchor:  # anchor/2 ||w - w0||^2, spread over the step's micro-batches
            distance = sum((p - self.start[n]).square().sum() for n, p in self.params.items())
            total = total + self.args.online_anchor / (2 * self.args.accum_iter) * distance
        return total

    def update(self):
        if self.args.clip_grad:  # over all adapted weights, as torch.nn.utils.clip_grad_norm_
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.args.clip_grad)
        super().update()

    @torch.no_grad()
    def after_step(self, index, step):
        if self.args.online_restore:  # each weight back to its loaded value with this probability
            gen = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.args.seed, index, Stream.RESTORE, step))
            back = torch.rand(sum(p.numel() for p in self.params.values()), generator=gen, device=self.device)
            back = back < self.args.online_restore
            for (name, p), keep in zip(self.params.items(), back.split([p.numel() for p in self.params.values()])):
                p.copy_(torch.where(keep.view(p.shape), self.start[name], p))
        if self.average is not None:  # average = m average + (1 - m) w
            torch._foreach_lerp_(list(self.average.values()), list(self.params.values()), 1 - self.args.online_ema)

    def logits(self, image):
        if self.average is None:
            return super().logits(image)
        weights = {f'model.{name}': w for name, w in self.average.items()}
        return torch.func.functional_call(ModelCall(self.model), weights, (lambda model, x: model.logits(x), image))

    @torch.no_grad()
    def distance_from_start(self):
        """||w - w0||: how far the adapted weights are from the loaded ones (a host float)."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - self.start[n])
                                                     for n, p in self.params.items()])).item()

    def state(self):
        """What the stream carries, by name: the adapted weights, the optimiser's and loss scaler's state, the
        images begun, and the average of --online_ema."""
        return {'weights': {name: p.detach() for name, p in self.params.items()},
                'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict(), 'images': self.images,
                **({'average': {n: w.clone() for n, w in self.average.items()}} if self.average is not None else {})}

    @torch.no_grad()
    def load_state(self, state):
        for name, p in self.params.items():
            p.copy_(state['weights'][name])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        self.images = state['images']
        if self.average is not None:
            for name, w in self.average.items():
                w.copy_(state['average'][name])

    def resume(self, position, before):
        """Continue a stream after `position` images: the state saved there, and the window refilled with the
        items before it ({'image', 'raw'}, util/datasets.TestTimeDataset's)."""
        if position:
            self.load_state(self.state_files.load(position))
        for item in before:
            self.window.append((item['image'].unsqueeze(0).to(self.device),
                                item['raw'].to(self.device) if 'raw' in item else None))

    @contextlib.contextmanager
    def saved_with_results(self):
        """The state after the images begun, written before the results it goes with are flushed; older
        states removed after, so a kill at any moment leaves the state at which the results end."""
        if self.images != self.saved_at:
            self.state_files.save(self.images, self.state())
            self.saved_at = self.images
        yield
        self.state_files.prune(self.images)


class Online:
    """Online TTT-MAE as a run over a folder sees it (engine_run.test_time_training's protocol; Episodic is
    the paper's): the selected images in stream order (--stream_order), each process's own stream a
    contiguous piece of it, continued where its results end, with the number of streams among the run's
    settings and the drift in results.json."""

    def settings(self, args):
        """Each process runs its own stream: their number changes the results."""
        return {'online': True, 'online_processes': args.world_size}

    def todo(self, args, run, left):
        """This process's images left: its stream after the position its results reach."""
        if args.world_size > 1:
            print(f"note: {args.world_size} processes run {args.world_size} streams, each over a contiguous share "
                  f"of the images (one stream: one process)")
        stream = stream_order(run.indices, args.stream_order, args.seed, [path for path, _ in run.dataset.samples])
        self.share = process_share(stream, args.rank, args.world_size)
        self.position = stream_position(self.share, run.store.done_indices())
        return self.share[self.position:]

    def trainer(self, args, run, load_items):
        trainer = OnlineTrainer(run.model, args, run.device, run.class_subset, StreamState(args.output_dir, args.rank))
        trainer.resume(self.position, load_items(self.share[max(0, self.position - args.online_window + 1):self.position]))
        return trainer

    def summary(self, records):
        return {'online': True, 'drift': drift(records)}

    def finish(self, args):
        """A complete stream is never continued: its saved states (GiBs per process for a ViT) go."""
        shutil.rmtree(os.path.join(args.output_dir, 'online'), ignore_errors=True)
