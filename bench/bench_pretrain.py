"""Pre-training throughput: images/s and peak memory of forward + backward + AdamW step.

  python bench/bench_pretrain.py --model mae_vit_tiny_patch4 --batch_size 64 --device cpu
  python bench/bench_pretrain.py --model mae_vit_large_patch16 --batch_size 64 --device cuda
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import device_name, peak_memory_gib, print_table, reset_peak_memory, timed  # noqa: E402
from models_mae import build_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_tiny_patch4')
    parser.add_argument('--batch_size', default=64, type=int)
    parser.add_argument('--iters', default=10, type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args.model, norm_pix_loss=True).to(device)
    size = model.patch_embed.img_size[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    images = torch.randn(args.batch_size, 3, size, size, device=device)

    def step():
        with torch.autocast('cuda', enabled=device.type == 'cuda'):  # fp16 AMP on CUDA, as MAE
            loss = model(images, mask_ratio=0.75)[0]['mae']
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        step()
    reset_peak_memory(device)
    _, seconds = timed(lambda: [step() for _ in range(args.iters)], device)
    precision = 'fp16 AMP' if device.type == 'cuda' else 'fp32'
    print_table(['device', 'model', 'batch', 'precision', 'images/s', 'peak memory (GiB)'],
                [[device_name(device), args.model, args.batch_size, precision,
                  f"{args.batch_size * args.iters / seconds:.1f}", f"{peak_memory_gib(device):.2f}"]])


if __name__ == '__main__':
    main()
