"""Test-time-training speed per mode: seconds per image, images/s and peak memory, next to the arithmetic
floor (FLOPs per image over the measured matmul rate), and with --naive the released-style loop that
deep-copies the model and decodes the image for every step (util/reference_loop.py), in the same run.

A mode is flags joined by '+': default (the faithful loop), compile, K<n> (--parallel_images n), bf16 or
fp16 (--amp). The modes are timed in turns, --repeats times each, and the median is reported, so that a
slow moment of a shared machine does not land on one mode only. Prints a table and writes --json.

  python bench/bench_ttt.py --model mae_vit_tiny_patch4 --image_size 32 --batch_size 16 --steps 20 \\
      --modes default compile+K4 --naive --json bench/results/cpu-2core.json          # the example, CPU
  python bench/bench_ttt.py --model mae_vit_large_patch16 --batch_size 128 --steps 20 --images 4 \\
      --modes default compile bf16 compile+bf16 --naive --json bench/results/h200.json  # the paper, GPU
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (count_flops, device_name, matmul_tflops, peak_memory_gib, print_table,  # noqa: E402
                          reset_peak_memory, timed)
from engine_test_time import AMP_DTYPES, TestTimeTrainer, groups_of  # noqa: E402
from main_test_time_training import check_args, get_args_parser  # noqa: E402
from models_mae import build_model  # noqa: E402
from util.datasets import TestTimeDataset  # noqa: E402
from util.io import write_json  # noqa: E402
from util.reference_loop import reference_adapt  # noqa: E402
from util.run_setup import set_precision  # noqa: E402


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
    """'compile+K4+bf16' -> the script's flags."""
    flags = []
    for part in mode.split('+'):
        if part == 'compile':
            flags.append('--compile')
        elif part[:1] == 'K' and part[1:].isdigit():
            flags += ['--parallel_images', part[1:]]
        elif part in ('bf16', 'fp16'):
            flags += ['--amp', part]
        elif part != 'default':
            raise SystemExit(f"error: unknown mode part {part!r} in {mode!r} (default, compile, K<n>, bf16, fp16)")
    return flags


def ttt_args(bench, mode, size):
    args = get_args_parser().parse_args([
        '--data_path', '-', '--resume_model', '-', '--resume_finetune', '-', '--model', bench.model,
        '--batch_size', str(bench.batch_size), '--steps_per_example', str(bench.steps), '--single_crop',
        '--norm_pix_loss', '--device', bench.device, *mode_flags(mode)])
    check_args(args)
    args.input_size, args.lr = size, args.blr * args.batch_size / 256
    return args


class Mode:
    """One row of the table: a trainer on its own copy of the model, timed over the images in turns."""

    def __init__(self, bench, mode, model, samples, device):
        self.name, self.device, self.seconds = mode, device, []
        size = model.patch_embed.img_size[0]
        self.args = ttt_args(bench, mode, size)
        self.trainer = TestTimeTrainer(copy.deepcopy(model), self.args, device, k=self.args.parallel_images)
        self.loader = torch.utils.data.DataLoader(TestTimeDataset(samples, range(len(samples)), size),
                                                  batch_size=None, num_workers=0)  # decoding is part of the cost
        items = list(self.loader)
        self.run(items[:self.trainer.k])  # warm-up (and compilation)
        reset_peak_memory(device)
        self.time_once()
        self.peak = peak_memory_gib(device)

    def run(self, items):
        for group in groups_of(items, self.trainer.k):
            labels = torch.tensor([item['label'] for item in group], device=self.device)
            images = torch.stack([item['image'] for item in group]).to(self.device).unsqueeze(1)
            self.trainer.adapt([item['index'] for item in group], labels, images)

    def time_once(self):
        _, seconds = timed(lambda: self.run(iter(self.loader)), self.device)
        self.seconds.append(seconds / len(self.loader.dataset))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_tiny_patch4')
    parser.add_argument('--batch_size', default=16, type=int)
    parser.add_argument('--steps', default=20, type=int)
    parser.add_argument('--images', default=16, type=int, help='images timed per mode and repeat')
    parser.add_argument('--image_size', default=224, type=int,
                        help='side of the JPEG files read (ImageNet-C files are 224x224)')
    parser.add_argument('--modes', nargs='+', default=['default'], help="e.g. default compile+K4 bf16")
    parser.add_argument('--naive', action='store_true',
                        help='also time the released-style loop, in the precision of each --amp in the modes')
    parser.add_argument('--repeats', default=3, type=int, help='timings per mode (the median is reported)')
    parser.add_argument('--strict_fp32', action='store_true', help='on CUDA, no TF32')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', default=None, help='also write the table here as JSON')
    bench = parser.parse_args()
    device = torch.device(bench.device)
    set_precision(device, bench.strict_fp32)
    torch.manual_seed(0)
    model = build_model(bench.model, norm_pix_loss=True)
    size = model.patch_embed.img_size[0]
    base_cpu = copy.deepcopy(model)
    model.to(device)
    fp32 = 'fp32' if device.type == 'cpu' or bench.strict_fp32 else 'tf32'
    precisions = sorted({next((p for p in m.split('+') if p in AMP_DTYPES), 'none') for m in bench.modes})
    rates = {p: matmul_tflops(device, AMP_DTYPES[p] or torch.float32) for p in precisions}
    with tempfile.TemporaryDirectory() as folder:
        samples = make_images(folder, bench.images, bench.image_size)
        args = ttt_args(bench, 'default', size)
        flops = count_flops(lambda: reference_adapt(base_cpu, samples[0][0], 0, 0, args, device))
        modes = [Mode(bench, mode, model, samples, device) for mode in bench.modes]
        naive = {}
        for _ in range(bench.repeats - 1):  # in turns, so that a slow spell of the machine is shared
            for mode in modes:
                mode.time_once()
        for precision in precisions if bench.naive else []:
            dtype = AMP_DTYPES[precision]
            run = lambda: [reference_adapt(base_cpu, p, label, i, args, device, dtype)
                           for i, (p, label) in enumerate(samples)]
            naive[precision] = statistics.median(timed(run, device)[1] / len(samples) for _ in range(bench.repeats))

    rows, table = [], []
    for mode in modes:
        precision = mode.args.amp
        s = statistics.median(mode.seconds)
        row = {'mode': mode.name, 'precision': fp32 if precision == 'none' else precision, 's_per_image': s,
               'images_per_s': 1 / s, 'repeats_s_per_image': mode.seconds, 'peak_memory_gib': mode.peak,
               'tflop_per_image': flops / 1e12, 'matmul_tflop_per_s': rates[precision],
               'floor_s_per_image': flops / 1e12 / rates[precision],
               'speedup_vs_released_style': naive[precision] / s if precision in naive else None}
        rows.append(row)
    for precision, s in naive.items():
        rows.append({'mode': 'released-style loop', 'precision': fp32 if precision == 'none' else precision,
                     's_per_image': s, 'images_per_s': 1 / s, 'tflop_per_image': flops / 1e12,
                     'matmul_tflop_per_s': rates[precision], 'floor_s_per_image': flops / 1e12 / rates[precision],
                     'speedup_vs_released_style': 1.0})
    for r in rows:
        table.append([r['mode'], r['precision'], f"{r['s_per_image']:.3f}", f"{r['images_per_s']:.2f}",
                      f"{r['peak_memory_gib']:.2f}" if r.get('peak_memory_gib') is not None else '',
                      f"{r['floor_s_per_image']:.3f}", f"{r['floor_s_per_image'] / r['s_per_image']:.0%}",
                      f"{r['speedup_vs_released_style']:.2f}x" if r['speedup_vs_released_style'] else ''])
    threads = torch.get_num_threads()
    header = (f"{device_name(device)}, torch {torch.__version__}, {bench.model}, batch {bench.batch_size}, "
              f"{bench.steps} steps, single crop, {bench.images} images x {bench.repeats} repeats per mode, "
              f"{flops / 1e12:.4g} TFLOP/image")
    print(header)
    print_table(['mode', 'precision', 's/image', 'images/s', 'peak mem (GiB)', 'floor s/image', 'of floor',
                 'vs released-style'], table)
    if device.type == 'cpu':
        print('peak mem on the CPU: the process\'s peak resident memory so far')
    if bench.json:
        write_json(bench.json, {'device': device_name(device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
                                'threads': threads, 'model': bench.model, 'batch_size': bench.batch_size,
                                'steps': bench.steps, 'image_size': bench.image_size, 'images': bench.images,
                                'repeats': bench.repeats, 'command': ' '.join(sys.argv), 'rows': rows})


if __name__ == '__main__':
    main()
