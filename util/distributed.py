"""Distributed set-up for every launcher: none, torch.distributed.launch, torchrun, SLURM."""
import datetime
import os

import torch
import torch.distributed as dist

from util.cli import UserError


def init_distributed_mode(args):
    """Fill args.rank/world_size/gpu/distributed and start the process group when there is one.

    torchrun and torch.distributed.launch set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; SLURM sets
    SLURM_PROCID/SLURM_NTASKS. When MASTER_ADDR is set we rendezvous through env://, whatever
    --dist_url says, so that a rerun of the same command never trips over a stale file:// store.
    """
    env, requested, launched = os.environ, args.world_size, True
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', args.local_rank if args.local_rank >= 0 else 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', args.rank % max(torch.cuda.device_count(), 1)))
    else:
        args.rank, args.world_size, args.gpu, launched = 0, 1, 0, False
    if requested is not None and requested != args.world_size:
        raise UserError(f"--world_size {requested}, but {args.world_size} process(es) were launched "
                        f"(the launcher sets the number: torchrun --nproc_per_node, srun --ntasks)")
    args.distributed = args.world_size > 1
    if not launched:
        return
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    if not args.distributed:
        return
    init_method = 'env://' if 'MASTER_ADDR' in env and 'MASTER_PORT' in env else args.dist_url
    if init_method == 'env://' and not ('MASTER_ADDR' in env and 'MASTER_PORT' in env):
        raise UserError(f"{args.world_size} processes but no MASTER_ADDR/MASTER_PORT: launch with torchrun, "
                        f"or set them, or pass --dist_url file:///shared/path/init_file")
    if init_method.startswith('file://'):  # a FileStore in a missing folder waits forever, silently
        os.makedirs(os.path.dirname(init_method[len('file://'):]) or '.', exist_ok=True)
    backend = 'nccl' if use_cuda else 'gloo'
    print(f"| distributed init (rank {args.rank} of {args.world_size}, {backend}): {init_method}", flush=True)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=60))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master):
    """Silence print() on every rank but 0 (print(..., force=True) still prints)."""
    import builtins
    builtin_print = builtins.print

    def print(*args, force=False, **kwargs):
        if is_master or force:
            builtin_print(*args, **kwargs)
    builtins.print = print


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def broadcast_object(objects):
    """Replace the list `objects` in place by rank 0's."""
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(objects, src=0)


def all_reduce_mean(x):
    """Average a Python number over processes."""
    if not is_dist_avail_and_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def destroy():
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def wrap_model(model, args, device):
    """(model to train, the bare model): DistributedDataParallel when several processes run."""
    if not args.distributed:
        return model, model
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    return ddp, ddp.module
