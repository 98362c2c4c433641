"""Shared helpers for the benchmarks: timing with device sync, memory, matmul rate, FLOP counts, versions."""
import resource
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def reset_peak_memory(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats()


def memory_allocated_gib(device):
    """GPU memory held by tensors now (0 on the CPU, where only the process's peak is known)."""
    return torch.cuda.memory_allocated() / 2 ** 30 if torch.device(device).type == 'cuda' else 0.


def peak_memory_gib(device):
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def matmul_tflops(device, dtype, n=None, repeat=10):
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product."""
    n = n or (8192 if torch.device(device).type == 'cuda' else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(repeat)], device)
    return 2 * n ** 3 * repeat / seconds / 1e12


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def device_name(device):
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        cpu = 'CPU'
    return f"{cpu}, {torch.get_num_threads()} threads"


def driver_version():
    """The NVIDIA driver's version (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'
    print(line(header))
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in rows:
        print(line(row))
