"""Test-time-training speed per mode: seconds per image, images/s, warm-up (compile) time and peak memory,
next to the arithmetic floor (FLOPs per image over the measured matmul rate), and whether CUDA graphs ran.

A mode is parts joined by '+': default (the faithful loop), compile, K<n> (--parallel_images n), bf16 or
fp16 (--amp), crops (random-crop views: the script without --single_crop), released (the released-style
loop of bench/reference_loop.py, which deep-copies the model and decodes the image for every step; with
bf16 or fp16 in that precision). Each mode runs alone, one after the other: its first group of images is
the warm-up (compilation, CUDA graph recording), then --repeats timings of every image, the median
reported; then its trainer, compiled code and CUDA graphs are freed before the next mode starts. The
JSON is rewritten after every mode, so a run that is cut short keeps the modes that finished.

  python bench/bench_ttt.py --model mae_vit_tiny_patch4 --image_size 32 --batch_size 16 --steps 20 \\
      --modes default compile+K4 released --json bench/results/cpu-2core.json          # the example, CPU
  python bench/bench_ttt.py --model mae_vit_large_patch16 --batch_size 128 --steps 20 --images 2 --repeats 1 \\
      --modes default released crops compile compile+bf16 --json OUT/h200.json      # the paper, GPU
"""
import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import timm
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (count_flops, device_name, driver_version, matmul_tflops, memory_allocated_gib,  # noqa: E402
                          peak_memory_gib, print_table, reset_peak_memory, timed)
from engine_run import groups_of, make_trainer, set_precision  # noqa: E402
from engine_test_time import AMP_DTYPES  # noqa: E402
from main_test_time_training import check_args, get_args_parser as ttt_parser  # noqa: E402
from models_mae import build_model  # noqa: E402
from util.cli import UserError, run_main  # noqa: E402
from util.datasets import TestTimeDataset  # noqa: E402
from util.io import write_json  # noqa: E402
from bench.reference_loop import reference_adapt  # noqa: E402

PEAK_MEMORY = {'cuda': "the mode's own peak of GPU memory held by tensors, over what was held before it started",
               'cpu': "the process's peak resident memory so far (the CPU keeps no per-mode peak)"}


def make_images(folder, count, size):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f'{i}.JPEG')
        # smooth content, closer to a photo than white noise is for the JPEG decoder
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(path, quality=85)
        paths.append((path, i % 10))
    return paths


def mode_flags(mode):
    """'compile+K4+bf16' -> main_test_time_training.py's flags; 'released' adds none."""
    parts, flags = mode.split('+'), ['--single_crop']
    for part in parts:
        if part == 'compile':
            flags.append('--compile')
        elif part[:1] == 'K' and part[1:].isdigit():
            flags += ['--parallel_images', part[1:]]
        elif part in ('bf16', 'fp16'):
            flags += ['--amp', part]
        elif part == 'crops':
            flags.remove('--single_crop')
        elif part not in ('default', 'released'):
            raise UserError(f"unknown mode part {part!r} in {mode!r} (default, compile, K<n>, bf16, fp16, crops, "
                            f"released)")
    if 'released' in parts and not set(parts) <= {'released', 'bf16', 'fp16'}:
        raise UserError(f"{mode!r}: the released-style loop takes only a precision (released+bf16)")
    return flags


def ttt_args(bench, mode, size):
    args = ttt_parser().parse_args([
        '--data_path', '-', '--resume_model', '-', '--resume_finetune', '-', '--model', bench.model,
        '--batch_size', str(bench.batch_size), '--steps_per_example', str(bench.steps), '--norm_pix_loss',
        '--device', bench.device, '--finetune_mode', bench.finetune_mode, *mode_flags(mode)])
    check_args(args)
    args.input_size = size
    return args


def flops_per_image(model_cpu, path, args, device):
    """FLOPs of one image: counted on one classification and one step, which the others repeat."""
    def counted(steps):
        return count_flops(lambda: reference_adapt(model_cpu, path, 0, 0, argparse.Namespace(
            **{**vars(args), 'steps_per_example': steps}), device))
    classify = counted(0)
    step = counted(1) - 2 * classify
    return args.steps_per_example * step + (args.steps_per_example + 1) * classify


def adapt_all(trainer, items, device):
    for group in groups_of(items, trainer.k):
        labels = torch.tensor([item['label'] for item in group], device=device)
        images = torch.stack([item['image'] for item in group]).to(device).unsqueeze(1)
        raws = [item['raw'].to(device) if 'raw' in item else None for item in group]
        trainer.adapt([item['index'] for item in group], labels, images, raws)


def cudagraph_skips():
    from torch._dynamo.utils import counters
    return counters['inductor']['cudagraph_skips']  # bumped by inductor for every graph it runs without


def measure(mode, args, precision, bench, model, model_cpu, samples, device):
    """One mode alone: a row of the table."""
    start_memory, skips = memory_allocated_gib(device), cudagraph_skips()
    reset_peak_memory(device)
    start = time.perf_counter()
    if 'released' in mode.split('+'):
        k, amp = 1, AMP_DTYPES[args.amp]

        def run(indices):  # decodes the image itself, for every step
            for i in indices:
                reference_adapt(model_cpu, samples[i][0], samples[i][1], i, args, device, amp)
    else:
        trainer = make_trainer(copy.deepcopy(model), args, device)
        size, k = model.patch_embed.img_size[0], trainer.k

        def run(indices):  # decoding is part of the cost
            adapt_all(trainer, TestTimeDataset(samples, indices, size, raw=not args.single_crop), device)
    setup = time.perf_counter() - start
    _, warmup = timed(lambda: run(range(k)), device)
    seconds = [timed(lambda: run(range(len(samples))), device)[1] / len(samples) for _ in range(bench.repeats)]
    s = statistics.median(seconds)
    graphs = args.compile and device.type == 'cuda'
    return {'mode': mode, 'flags': mode_flags(mode), 'precision': precision,
            'views': 'single crop' if args.single_crop else 'random crops', 'setup_s': setup, 'warmup_s': warmup,
            'compile_s': max(warmup - k * s, 0.) if args.compile else None, 's_per_image': s,
            'images_per_s': 1 / s, 'repeats_s_per_image': seconds,
            'peak_memory_gib': peak_memory_gib(device) - start_memory,
            'cudagraph_skips': cudagraph_skips() - skips if graphs else None,
            'cuda_graphs': cudagraph_skips() == skips if graphs else None}


def free(device):
    """Drop what a finished mode left: compiled code, CUDA graphs and their memory pool, cached blocks."""
    torch._dynamo.reset()
    if device.type == 'cuda':
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()  # torch._dynamo.reset() does not on every version
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def complete(rows, flops, rates):
    """Adds the floor and the speed-up over the released-style loop in the same precision to each row."""
    released = {r['precision']: r['s_per_image'] for r in rows
                if 'released' in r['mode'].split('+') and 'error' not in r}
    for r in rows:
        if 'error' not in r:
            r['floor_s_per_image'] = flops / 1e12 / rates[r['precision']]
            r['speedup_vs_released_style'] = released[r['precision']] / r['s_per_image'] \
                if r['precision'] in released else None


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_tiny_patch4')
    parser.add_argument('--batch_size', default=16, type=int)
    parser.add_argument('--steps', default=20, type=int)
    parser.add_argument('--images', default=16, type=int, help='images timed per mode and repeat')
    parser.add_argument('--image_size', default=224, type=int,
                        help='side of the JPEG files read (ImageNet-C files are 224x224)')
    parser.add_argument('--modes', nargs='+', default=['default'], help="e.g. default compile+K4 bf16 released")
    parser.add_argument('--repeats', default=3, type=int, help='timings per mode (the median is reported)')
    parser.add_argument('--strict_fp32', action='store_true', help='on CUDA, no TF32')
    parser.add_argument('--finetune_mode', default='encoder', help='the rule for which parameters adapt, in every mode')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', default=None, help='also write the table here as JSON, after every mode')
    return parser


def main(bench):
    for name, value in (('images', bench.images), ('repeats', bench.repeats), ('steps', bench.steps),
                        ('batch_size', bench.batch_size)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    device = torch.device(bench.device)
    set_precision(device, bench.strict_fp32)
    torch.manual_seed(0)
    model = build_model(bench.model, norm_pix_loss=True)
    size = model.patch_embed.img_size[0]
    modes = {mode: ttt_args(bench, mode, size) for mode in bench.modes}  # every mode checked before any runs
    model_cpu = copy.deepcopy(model)  # what the released-style loop copies for every image
    model.to(device)
    fp32 = 'fp32' if device.type == 'cpu' or bench.strict_fp32 else 'tf32'
    precisions = {mode: fp32 if args.amp == 'none' else args.amp for mode, args in modes.items()}
    rates = {p: matmul_tflops(device, AMP_DTYPES.get(p) or torch.float32) for p in set(precisions.values())}
    result = {'device': device_name(device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
              'driver': driver_version() if device.type == 'cuda' else None, 'timm': timm.__version__,
              'torchvision': torchvision.__version__, 'threads': torch.get_num_threads(), 'model': bench.model,
              'batch_size': bench.batch_size, 'steps': bench.steps, 'image_size': bench.image_size,
              'finetune_mode': bench.finetune_mode,
              'images': bench.images, 'repeats': bench.repeats,
              'peak_memory': PEAK_MEMORY[device.type], 'command': ' '.join(sys.argv),
              'modes': bench.modes, 'rows': []}
    print(f"{result['device']}, torch {torch.__version__}, {bench.model}, batch {bench.batch_size}, "
          f"{bench.steps} steps, {bench.images} images x {bench.repeats} repeats per mode", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        samples = make_images(folder, bench.images, bench.image_size)
        flops = flops_per_image(model_cpu, samples[0][0], ttt_args(bench, 'default', size), device)
        result.update(tflop_per_image=flops / 1e12, matmul_tflop_per_s=rates)
        for mode, args in modes.items():
            try:
                row = measure(mode, args, precisions[mode], bench, model, model_cpu, samples, device)
                print(f"{mode}: {row['s_per_image']:.3f} s/image, warm-up {row['warmup_s']:.1f} s, "
                      f"peak memory {row['peak_memory_gib']:.2f} GiB", flush=True)
            except Exception as e:  # one mode's failure (out of memory, a compile error) must not lose the others
                traceback.print_exc()
                row = {'mode': mode, 'flags': mode_flags(mode), 'precision': precisions[mode],
                       'error': f"{type(e).__name__}: {e}".splitlines()[0]}
            free(device)
            result['rows'].append(row)
            complete(result['rows'], flops, rates)
            if bench.json:
                write_json(bench.json, result)
    ok = [r for r in result['rows'] if 'error' not in r]
    print(f"{flops / 1e12:.4g} TFLOP/image; peak memory: {PEAK_MEMORY[device.type]}")
    print_table(['mode', 'precision', 'views', 's/image', 'images/s', 'warm-up s', 'peak mem (GiB)', 'floor s/image',
                 'of floor', 'vs released-style', 'CUDA graphs'],
                [[r['mode'], r['precision'], r['views'], f"{r['s_per_image']:.3f}", f"{r['images_per_s']:.2f}",
                  f"{r['warmup_s']:.1f}", f"{r['peak_memory_gib']:.2f}", f"{r['floor_s_per_image']:.3f}",
                  f"{r['floor_s_per_image'] / r['s_per_image']:.0%}",
                  f"{r['speedup_vs_released_style']:.2f}x" if r['speedup_vs_released_style'] else '',
                  {None: '', True: 'yes', False: f"no ({r['cudagraph_skips']} skipped)"}[r['cuda_graphs']]]
                 for r in ok])
    failed = [r for r in result['rows'] if 'error' in r]
    for r in failed:
        print(f"{r['mode']}: failed: {r['error']}")
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
