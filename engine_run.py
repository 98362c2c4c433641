"""A test-time run from its flags to its output files, for the scripts to call (docs/architecture.md):

    prepare             processes, precision, the combined model, the test images, the results folder
                        and the images left in it
    test_time_training  prepare, then the trainer the flags ask for, adapt_images over the images left,
                        the outputs; in the paper's protocol (Episodic) or another one passed in
                        (engine_online.Online: main_online_ttt.py)
    baseline            prepare, then classify_images without adaptation, the outputs

A protocol says what a run over a folder does that depends on the method: settings(args) (what the
results depend on beyond the flags), todo(args, run, left) (this process's images, in order),
trainer(args, run, load_items), summary(records) (what results.json adds) and finish(args) (once the
run is complete).
"""
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import models_vit  # noqa: F401 (registers MAE's fine-tuned ViTs, the paper's Fine-Tune row: the baseline only)
from engine_test_time import AMP_DTYPES, TestTimeTrainer, classification
from models_mae import build_model
from util import distributed
from util.checkpoint import load_checkpoint, load_state_dict_strict, load_test_checkpoints, model_state
from util.cli import make_output_dir
from util.datasets import TestTimeDataset, class_folders, head_classes, imagenet_subset, load_test_set
from util.errors import UserError
from util.image_selection import check_selection_flags, select_images
from util.io import file_sha256
from util.logger import ProgressLine, tensorboard_writer
from util.outputs import ReadableOutputs, write_outputs
from util.reconstructions import Reconstructions
from util.records import ResultStore
from util.run_config import check_run_config, run_config
from util.signals import StopRequested


@dataclass
class Run:
    """What a test-time run's set-up found and decided (args stays what the user typed)."""
    device: torch.device
    dataset: object  # util.datasets.ImageFolder
    indices: np.ndarray  # every selected image, in evaluation order
    model: torch.nn.Module
    class_subset: Optional[list]  # the head's outputs predictions are restricted to (ImageNet-R, -A), or None
    store: ResultStore
    checkpoint_sha256: dict  # {'resume_model': ..., 'resume_finetune': ...}
    subset_file_sha256: Optional[str]
    num_images_in_folder: int
    left: Optional[list]  # the selected images not done yet (every process's), None when the run is complete

    def device_record(self):
        """What results.json records of the device: its name (a CPU's model name), the torch version, and this
        process's peak memory: held by tensors on a GPU, resident on a CPU."""
        if self.device.type == 'cuda':
            return {'device': torch.cuda.get_device_name(self.device), 'torch': torch.__version__,
                    'peak_memory_gib': torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
                    'peak_memory': 'GPU memory held by tensors, the main process'}
        return {'device': cpu_name(), 'torch': torch.__version__,
                # ru_maxrss: KiB on Linux, bytes on macOS
                'peak_memory_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == 'darwin'
                                                                                              else 20),
                'peak_memory': 'resident memory, the main process'}


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform says)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'cpu'


def set_precision(device, strict_fp32):
    """TF32 on CUDA as the released PyTorch 1.11 ran it, unless strict fp32 is asked for."""
    if torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = not strict_fp32
        torch.backends.cudnn.allow_tf32 = not strict_fp32


def build_test_model(args, device, adapting=False):
    """The MAE checkpoint plus the probe's head, loaded strictly (docs/method.md), and the head's classes;
    or a fine-tuned ViT (models_vit.py) from its own checkpoint alone, which has no decoder to adapt with."""
    model = build_model(args.model, img_size=args.input_size, norm_pix_loss=getattr(args, 'norm_pix_loss', False),
                        head_type=args.head_type, classifier_depth=args.classifier_depth,
                        num_classes=args.num_classes)
    args.input_size = model.parts().image_size
    if adapting and not getattr(model, 'takes_test_time_training', True):
        raise UserError(f"--model {args.model} has no decoder: it takes the baseline only (test_without_adaptation.py)")
    if getattr(model, 'takes_test_time_training', True):
        if not args.resume_model:
            raise UserError(f"--model {args.model} needs --resume_model, the MAE checkpoint with its decoder")
        state, classes = load_test_checkpoints(model, args.resume_model, args.resume_finetune, args.head_type)
        load_state_dict_strict(model, state, f"{args.resume_model} + {args.resume_finetune}")
    else:  # a fine-tuned ViT: one checkpoint holds it whole
        if args.resume_model:
            raise UserError(f"--model {args.model} is a fine-tuned ViT without a decoder: pass its checkpoint as "
                            f"--resume_finetune alone, without --resume_model")
        checkpoint = load_checkpoint(args.resume_finetune, 'fine-tuned ViT checkpoint (--resume_finetune)')
        load_state_dict_strict(model, model_state(checkpoint), args.resume_finetune)
        classes = checkpoint.get('classes') if isinstance(checkpoint, dict) else None
    return model.to(device), head_classes(args, classes, args.num_classes)


def images_left(store, indices):
    """The selected images not finished yet, or None when the run is complete and written."""
    done = store.done_indices()
    left = [int(i) for i in indices if int(i) not in done]
    results = os.path.join(store.output_dir, 'results.json')
    if not left and os.path.exists(results):
        with open(results) as f:
            if json.load(f).get('complete'):
                print(f"all {len(indices)} images already done: results in {store.output_dir}")
                return None
    print(f"{len(indices)} images selected, {len(indices) - len(left)} already done, {len(left)} to do")
    return left


def prepare(args, settings=None, adapting=False):
    """The shared start of the test-time scripts: processes, precision, model, data, the results folder (its
    recorded settings checked against these, plus settings(args) where given), and the images left, which
    rank 0 decides and tells the others so that all share out the same list. Returns a Run."""
    check_selection_flags(args)
    class_folders(args.data_path)  # a wrong path fails before the checkpoints are read
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    set_precision(device, args.strict_fp32)
    model, classes = build_test_model(args, device, adapting)
    dataset = load_test_set(args, classes)
    indices = select_images(args, dataset)
    checkpoint_sha256 = {k: file_sha256(getattr(args, k)) for k in ('resume_model', 'resume_finetune')
                         if getattr(args, k)}
    # recorded: another list of the same name is refused
    subset_file_sha256 = file_sha256(args.subset_file) if args.subset_file else None
    make_output_dir(args.output_dir)
    store = ResultStore(args.output_dir, args.rank)
    config = run_config(args, checkpoint_sha256, subset_file_sha256, settings(args) if settings else None)
    check_run_config(store, config, distributed.is_main_process())
    left = [images_left(store, indices) if distributed.is_main_process() else None]
    distributed.broadcast_object(left)
    return Run(device, dataset, indices, model, imagenet_subset(args.dataset_name), store, checkpoint_sha256,
               subset_file_sha256, len(dataset), left[0])


def make_trainer(model, args, device, class_subset=None):
    """The paper's loop, or the fast one (engine_fast.py, imported only then) with --parallel_images or
    --compile."""
    if args.parallel_images > 1 or args.compile:
        from engine_fast import FastTrainer
        return FastTrainer(model, args, device, k=args.parallel_images, class_subset=class_subset)
    return TestTimeTrainer(model, args, device, class_subset)


class Episodic:
    """The paper's protocol: every image starts from the loaded weights, so the images left are dealt to the
    processes in turn, and nothing carries over between them."""

    def settings(self, args):
        return {}

    def todo(self, args, run, left):
        return left[args.rank::args.world_size]

    def trainer(self, args, run, load_items):
        return make_trainer(run.model, args, run.device, run.class_subset)

    def summary(self, records):
        return {}

    def finish(self, args):
        """Once every image is done: nothing is kept to continue from."""


def test_time_training(args, protocol=None):
    """Set up a run, adapt to every image left to do (protocol: Episodic, the paper's, unless given), write
    the outputs."""
    protocol = protocol or Episodic()
    run = prepare(args, protocol.settings, adapting=True)
    print(f"lr per image: {args.lr:.3g} (independent of the number of processes)")
    if run.left is None:
        distributed.destroy()
        return
    load_items = lambda indices: TestTimeDataset(run.dataset.samples, indices, args.input_size, raw=not args.single_crop)
    todo = protocol.todo(args, run, run.left)
    trainer = protocol.trainer(args, run, load_items)
    loader = torch.utils.data.DataLoader(load_items(todo), batch_size=None, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and run.device.type == 'cuda')
    figures = Reconstructions(args, run.dataset, run.indices[:args.save_reconstructions]) \
        if args.save_reconstructions else None
    log_writer = tensorboard_writer(args.log_dir)
    start = time.time()
    with ReadableOutputs(args, run, 'ttt', distributed.is_main_process(), protocol.summary) as outputs:
        done = adapt_images(trainer, loader, run.store, outputs, args, figures, log_writer)
    distributed.barrier()
    if distributed.is_main_process():
        result = write_outputs(args, run, 'ttt', time.time() - start, done * args.world_size, more=protocol.summary)
        if result['complete']:
            protocol.finish(args)
        if log_writer is not None:
            for key in [k for k in result if k.endswith('_per_step')]:  # accuracy, cross-entropy, each loss
                for step, value in enumerate(result[key]):
                    log_writer.add_scalar(f'ttt/{key}', value, step)
            log_writer.close()
    distributed.destroy()


def baseline(args):
    """Set up a run, classify every image left without adaptation, write the outputs."""
    run = prepare(args)
    if run.left is None:
        distributed.destroy()
        return
    loader = torch.utils.data.DataLoader(TestTimeDataset(run.dataset.samples, run.left[args.rank::args.world_size],
                                                         args.input_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and run.device.type == 'cuda')
    start = time.time()
    with ReadableOutputs(args, run, 'baseline', distributed.is_main_process()) as outputs:
        done = classify_images(run.model, loader, run.store, outputs, run.device, args, run.class_subset)
    distributed.barrier()
    if distributed.is_main_process():
        write_outputs(args, run, 'baseline', time.time() - start, done * args.world_size)
    distributed.destroy()


def groups_of(iterable, size):
    group = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def released_lines(index, record):
    """The released --verbose lines of one image, printed once it is done."""
    for step, ce in enumerate(record['ce_loss'][1:]):
        for key in record:
            if key.endswith('_loss') and key != 'ce_loss':
                print(f"datapoint {index} iter {step}: {'rec' if key == 'mae_loss' else key[:-5]}_loss "
                      f"{record[key][step]}")
        print(f"datapoint {index} iter {step}: class_loss {ce}")


def adapt_images(trainer, loader, store, outputs, args, figures=None, log_writer=None):
    """Adapt to every image the loader yields, trainer.k at a time; records go to `store`, flushed every
    args.flush_every images and on a stop signal, so that nothing finished is lost; `outputs`
    (util/outputs.ReadableOutputs) rewrites the readable files after a flush. figures:
    util/reconstructions.Reconstructions, or None. Returns the number of images done."""
    device, done, correct_last, between_images = trainer.device, 0, 0, True
    progress = ProgressLine(len(loader), args.print_freq)

    def flush():
        with trainer.saved_with_results():  # what a resumed run needs to continue exactly goes with them
            store.flush()
        outputs.update()
        distributed.raise_if_another_failed()  # with what is done saved

    with StopRequested() as stop:
        try:
            for group in groups_of(loader, trainer.k):
                between_images = False
                start = time.time()
                indices = [item['index'] for item in group]
                labels = torch.tensor([item['label'] for item in group], device=device)
                images = torch.stack([item['image'] for item in group]).to(device, non_blocking=True).unsqueeze(1)
                raws = [item['raw'].to(device, non_blocking=True) if 'raw' in item else None for item in group]
                observe = figures.observer(indices) if figures else None
                results = trainer.adapt(indices, labels, images, raws, observe)
                seconds = (time.time() - start) / len(group)  # adapt() ends with a host copy
                for item, record in zip(group, results):
                    done_steps = record.get('stop_step', args.steps_per_example)  # the losses of the steps run
                    if not all(np.all(np.isfinite(v[:done_steps + (k == 'ce_loss')])) for k, v in record.items()
                               if k.endswith('_loss')):
                        path = loader.dataset.samples[item['index']][0]
                        raise UserError(f"non-finite loss on image {item['index']} ({path}); stopping, the images "
                                        f"flushed before it are kept in {args.output_dir}")
                    if args.verbose:
                        released_lines(item['index'], record)
                    store.add(index=item['index'], label=item['label'], **record, seconds=seconds)
                    done += 1
                    correct_last += int(record['pred'][-1] == item['label'])
                    if done % args.flush_every == 0:
                        flush()
                    accuracy = 100 * correct_last / done
                    if progress.update(done, f"accuracy after {args.steps_per_example} steps {accuracy:.2f}%") \
                            and log_writer is not None:
                        log_writer.add_scalar('ttt/running_accuracy_last_step', accuracy, done)
                between_images = True
                if stop.signal is not None:
                    break
        except BaseException as e:
            # after a stop signal the loader's workers (sent the same signal by Ctrl-C or scancel) end, and
            # the loader raises between images: that is the stop, not an error
            if stop.signal is None or not isinstance(e, Exception) or not between_images:
                # an error can fall mid-image, where a carried state (online TTT-MAE) is not the one its results
                # end at: no run flushes then, and a rerun redoes the images since the last flush
                raise
        flush()
    if stop.signal is not None:
        print(f"stopped by signal {stop.signal}; {done} images saved, rerun the same command to continue",
              flush=True)
        raise SystemExit(128 + stop.signal)
    return done


@torch.no_grad()
def classify_images(model, loader, store, outputs, device, args, class_subset=None):
    """Classify batches of eval crops without adaptation; one record per image. Returns the count."""
    model.eval()
    device, amp_dtype = torch.device(device), AMP_DTYPES[args.amp]
    class_subset = None if class_subset is None else torch.as_tensor(class_subset)
    done, progress = 0, ProgressLine(len(loader.dataset), args.print_freq * loader.batch_size)
    try:
        for batch in loader:
            start = time.time()
            images = batch['image'].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model.logits(images)
            records = {k: v.numpy() for k, v in classification(logits.cpu(), batch['label'], class_subset).items()}
            seconds = (time.time() - start) / len(batch['index'])
            for i, index in enumerate(batch['index'].tolist()):
                store.add(index=index, label=int(batch['label'][i]), **{k: v[i:i + 1] for k, v in records.items()},
                          seconds=seconds)
            done += len(batch['index'])
            store.flush()
            outputs.update()
            progress.update(done)
    finally:
        store.flush()
    return done
