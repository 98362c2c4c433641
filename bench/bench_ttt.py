"""Test-time-training speed: seconds per image, images/s and peak memory, next to the arithmetic floor
(FLOPs per image over the measured matmul rate), and optionally against the released-style loop that
deep-copies the model and decodes the image for every step (util/reference_loop.py), in one run.

  python bench/bench_ttt.py --model mae_vit_tiny_patch4 --batch_size 32 --steps 10 --naive     # CPU
  python bench/bench_ttt.py --model mae_vit_large_patch16 --batch_size 128 --steps 20 --amp none bf16
"""
import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (count_flops, device_name, matmul_tflops, peak_memory_gib, print_table,  # noqa: E402
                          reset_peak_memory, timed)
from engine_test_time import TestTimeTrainer, groups_of  # noqa: E402
from main_test_time_training import get_args_parser  # noqa: E402
from models_mae import build_model  # noqa: E402
from util.datasets import TestTimeDataset  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_tiny_patch4')
    parser.add_argument('--batch_size', default=32, type=int)
    parser.add_argument('--steps', default=10, type=int)
    parser.add_argument('--images', default=8, type=int, help='images timed per mode (after one warm-up)')
    parser.add_argument('--image_size', default=224, type=int,
                        help='size of the JPEG files read (ImageNet-C files are 224x224)')
    parser.add_argument('--amp', nargs='+', default=['none'], choices=['none', 'bf16', 'fp16'])
    parser.add_argument('--strict_fp32', action='store_true')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--parallel_images', nargs='+', default=[1], type=int,
                        help='images adapted at once (vmap); one row per value')
    parser.add_argument('--naive', action='store_true', help='also time the deep-copy / decode-per-step loop')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    bench = parser.parse_args()
    if max(bench.parallel_images) > 1 and ('fp16' in bench.amp or bench.compile):
        parser.error('--parallel_images > 1 runs without --amp fp16 and --compile (see main_test_time_training.py)')
    device = torch.device(bench.device)
    set_precision(device, bench.strict_fp32)
    model = build_model(bench.model, norm_pix_loss=True)
    size = model.patch_embed.img_size[0]
    base_cpu = copy.deepcopy(model)
    model.to(device)
    with tempfile.TemporaryDirectory() as folder:
        samples = make_images(folder, bench.images + 1, bench.image_size)
        rows = [measure(bench, model, samples, amp, parallel, device)
                for amp in bench.amp for parallel in bench.parallel_images]
        if bench.naive:  # the released-style loop, fp32 (TF32 on CUDA unless --strict_fp32)
            args = ttt_args(bench, 'none', 1, size)
            _, seconds = timed(lambda: [reference_adapt(base_cpu, p, label, i, args, device)
                                        for i, (p, label) in enumerate(samples)], device)
            rows.append(['naive loop (deep copy, decode per step)', f"{seconds / len(samples):.3f}",
                         f"{len(samples) / seconds:.2f}", '', '', '', ''])
    print(f"{device_name(device)}, {bench.model}, batch {bench.batch_size}, {bench.steps} steps, "
          f"{len(samples)} images per mode")
    print_table(['mode', 's/image', 'images/s', 'peak mem (GiB)', 'TFLOP/image', 'matmul TFLOP/s',
                 'floor s/image'], rows)


def ttt_args(bench, amp, parallel, size):
    args = get_args_parser().parse_args([
        '--data_path', '-', '--resume_model', '-', '--resume_finetune', '-', '--model', bench.model,
        '--batch_size', str(bench.batch_size), '--steps_per_example', str(bench.steps), '--single_crop',
        '--norm_pix_loss', '--amp', amp, '--parallel_images', str(parallel)]
        + (['--compile'] if bench.compile else []))
    args.input_size, args.lr = size, args.blr * args.batch_size / 256
    return args


def measure(bench, model, samples, amp, parallel, device):
    """One table row: the default loop (or a flag's) over the images, decoding in workers included."""
    size = model.patch_embed.img_size[0]
    args = ttt_args(bench, amp, parallel, size)
    trainer = TestTimeTrainer(model, args, device, k=parallel)
    loader = torch.utils.data.DataLoader(TestTimeDataset(samples, range(len(samples)), size),
                                         batch_size=None, num_workers=2)

    def run(items):
        for group in groups_of(items, trainer.k):
            labels = torch.tensor([item['label'] for item in group], device=device)
            images = torch.stack([item['image'] for item in group]).to(device).unsqueeze(1)
            trainer.adapt([item['index'] for item in group], labels, images)

    items = list(loader)
    run(items[:trainer.k])  # warm-up (and compilation)
    flops = count_flops(lambda: run(items[:1]))
    reset_peak_memory(device)
    _, seconds = timed(lambda: run(iter(loader)), device)
    per_image = seconds / len(samples)
    rate = matmul_tflops(device, {'none': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp])
    precision = {'none': 'fp32' if device.type == 'cpu' or bench.strict_fp32 else 'tf32'}.get(amp, amp)
    mode = precision + (' compiled' if bench.compile else '')
    mode += f' x{parallel} images' if parallel > 1 else ''
    trainer.reset()  # the next mode starts from the same weights
    return [mode, f"{per_image:.3f}", f"{1 / per_image:.2f}", f"{peak_memory_gib(device):.2f}",
            f"{flops / 1e12:.3g}", f"{rate:.1f}", f"{flops / rate / 1e12:.3g}"]

if __name__ == '__main__':
    main()
