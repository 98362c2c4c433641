"""Where the time of one image's test-time training goes: a torch.profiler breakdown into matrix products,
attention, normalisation and other element-wise work, fused (compiled) kernels, the optimiser update and
the classifications, plus the time the device is idle between operations, next to the arithmetic floor.

On the CPU the time of an operation is its self time on the host; on CUDA it is its kernels' time on the
GPU. Idle is the wall time of the image minus the time inside operations (or kernels): Python, the
dispatcher and launch gaps. A mode is as in bench/bench_ttt.py (default, compile, K<n>, bf16).

  python bench/profile_ttt.py --model mae_vit_tiny_patch4 --batch_size 16 --modes default compile+K4
  python bench/profile_ttt.py --model mae_vit_large_patch16 --batch_size 128 --modes default compile bf16
"""
import argparse
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_ttt import free, ttt_args  # noqa: E402
from bench.common import count_flops, device_name, matmul_tflops, print_table, sync  # noqa: E402
import engine_fast  # noqa: E402
from engine_run import make_trainer, set_precision  # noqa: E402
from engine_test_time import AMP_DTYPES, TestTimeTrainer  # noqa: E402
from models_mae import build_model  # noqa: E402
from util.io import write_json  # noqa: E402

CATEGORIES = ('matmul', 'attention', 'normalisation / element-wise', 'fused kernels', 'optimiser update',
              'classification', 'idle between operations')


def category(name, shapes, k):
    """The category of an operator (CPU) or kernel (CUDA) by its name (and, for bmm, its shapes)."""
    n = name.lower()
    if n == 'aten::bmm' and shapes and shapes[0] and shapes[0][0] == k and k > 1:
        return 'matmul'  # a linear layer under vmap: one product per image's weights
    if any(key in n for key in ('scaled_dot_product', 'sdpa', 'flash', 'fmha', 'efficient_attention', 'softmax',
                                'bmm')):
        return 'attention'  # bmm otherwise: the explicit attention's products
    # cuBLAS names its kernels gemm, cutlass, sm80_xmma / sm90_xmma and, on Hopper, nvjet_*
    if any(key in n for key in ('aten::mm', 'aten::addmm', 'gemm', 'cutlass', 'xmma', 'nvjet', 'convolution',
                                'cublas', 'mkldnn')):
        return 'matmul'
    if 'compiledfxgraph' in n or n.startswith('triton_') or 'cpp_fused' in n:
        return 'fused kernels'
    return 'normalisation / element-wise'


def labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def breakdown(trainer, device, k):
    """Seconds per image by category for one group of k images."""
    labels = torch.zeros(k, dtype=torch.long, device=device)
    size = trainer.model.patch_embed.img_size[0]
    images = torch.randn(k, 1, 3, size, size, device=device)
    trainer.classify = labelled(trainer.classify, 'ttt/classification')
    trainer.optimizer.step = labelled(trainer.optimizer.step, 'ttt/optimiser update')
    trainer.adapt(list(range(k)), labels, images)  # warm-up (and compilation)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        trainer.adapt(list(range(k)), labels, images)
        sync(device)
        wall = time.perf_counter() - start
    totals = dict.fromkeys(CATEGORIES, 0.)
    for event in prof.events():
        region = None  # the labelled region the event runs in, if any
        parent = event
        while parent is not None:
            if parent.name.startswith('ttt/'):
                region = parent.name[4:]
                break
            parent = parent.cpu_parent
        if device.type == 'cuda':  # each kernel by its own name: one graph replay launches them all
            parts = [(kernel.name, kernel.duration / 1e6) for kernel in event.kernels]
        elif event.name.startswith(('ttt/', 'Torch-Compiled Region', 'CompiledFunction')):
            parts = []  # wrappers: their operations are counted themselves
        else:
            parts = [(event.name, event.self_cpu_time_total / 1e6)]
        for name, seconds in parts:
            totals[region or category(name, event.input_shapes, k)] += seconds
    totals['idle between operations'] = max(wall - sum(totals.values()), 0.)
    return {c: v / k for c, v in totals.items()}, wall / k


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mae_vit_tiny_patch4')
    parser.add_argument('--batch_size', default=16, type=int)
    parser.add_argument('--steps', default=20, type=int)
    parser.add_argument('--modes', nargs='+', default=['default'])
    parser.add_argument('--strict_fp32', action='store_true')
    parser.add_argument('--finetune_mode', default='encoder', help='the rule for which parameters adapt')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', default=None)
    parser.add_argument('--open_compiled', action='store_true',
                        help="compile without the CPU's C++ wrapper, so that the products inside a compiled graph "
                             "show as operations (slower: the wrapper is part of the mode)")
    bench = parser.parse_args()
    if bench.open_compiled:
        engine_fast.compiled = lambda fn, device: torch.compile(fn, dynamic=False)
    device = torch.device(bench.device)
    set_precision(device, bench.strict_fp32)
    torch.manual_seed(0)
    model = build_model(bench.model, norm_pix_loss=True)
    size = model.patch_embed.img_size[0]
    model.to(device)
    unsupported = [m for m in bench.modes if {'released', 'crops'} & set(m.split('+'))]
    if unsupported:
        raise SystemExit(f"error: {' '.join(unsupported)}: the profile runs the trainer on single-crop views")
    reference = TestTimeTrainer(copy.deepcopy(model), ttt_args(bench, 'default', size), device)
    images = torch.randn(1, 1, 3, size, size, device=device)
    flops = count_flops(lambda: reference.adapt([0], torch.zeros(1, dtype=torch.long, device=device), images))
    del reference
    result = {'device': device_name(device), 'torch': torch.__version__, 'model': bench.model,
              'batch_size': bench.batch_size, 'steps': bench.steps, 'modes': {}}
    rows = []
    for mode in bench.modes:
        args = ttt_args(bench, mode, size)
        parts, wall = breakdown(make_trainer(copy.deepcopy(model), args, device), device,
                                args.parallel_images)
        free(device)
        floor = flops / 1e12 / matmul_tflops(device, AMP_DTYPES[args.amp] or torch.float32)
        result['modes'][mode] = {'seconds_per_image': wall, 'floor_s_per_image': floor, 'parts_s_per_image': parts}
        if bench.json:  # after every mode: a run cut short keeps the modes that finished
            write_json(bench.json, result)
        rows.append([mode, f"{wall:.3f}", f"{floor:.3f}"] + [f"{parts[c]:.3f} ({parts[c] / wall:.0%})"
                                                              for c in CATEGORIES])
    print(f"{device_name(device)}, torch {torch.__version__}, {bench.model}, batch {bench.batch_size}, "
          f"{bench.steps} steps, single crop; seconds per image (share of the image's wall time)")
    print_table(['mode', 's/image', 'floor'] + list(CATEGORIES), rows)


if __name__ == '__main__':
    main()
