"""Distributed set-up for every launcher: none, torch.distributed.launch, torchrun, SLURM."""
import datetime
import os
import time

import torch
import torch.distributed as dist

from util.errors import UserError


def init_distributed_mode(args):
    """Fill args.rank/world_size/gpu/distributed, check the device, say what runs where, and start the
    process group when there is one.

    torchrun and torch.distributed.launch set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*. Under SLURM only the
    tasks srun starts are ranks (SLURM_STEP_NUM_TASKS, SLURM_PROCID): a plain `python SCRIPT` in an
    allocation of several tasks is one process, whatever SLURM_NTASKS says. When MASTER_ADDR is set we
    rendezvous through env://, whatever --dist_url says, so that a rerun of the same command never trips
    over a stale file:// store.
    """
    env, requested, launched = os.environ, args.world_size, True
    if getattr(args, 'dist_on_itp', False):  # the released --dist_on_itp: mpirun's ranks
        missing = [k for k in ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK')
                   if k not in env]
        if missing:
            raise UserError(f"--dist_on_itp takes the ranks OpenMPI sets, and {', '.join(missing)} is not set: "
                            f"launch with mpirun, or leave the flag out")
        env['RANK'], env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_RANK'], env['OMPI_COMM_WORLD_SIZE']
        env['LOCAL_RANK'] = env['OMPI_COMM_WORLD_LOCAL_RANK']
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        local_rank = int(env.get('LOCAL_RANK', args.local_rank if args.local_rank >= 0 else 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_STEP_NUM_TASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_STEP_NUM_TASKS'])
        local_rank = int(env.get('SLURM_LOCALID', 0))
    else:
        args.rank, args.world_size, local_rank, launched = 0, 1, 0, False
    if requested is not None and requested != args.world_size:
        raise UserError(f"--world_size {requested}, but {args.world_size} process(es) were launched "
                        f"(the launcher sets the number: torchrun --nproc_per_node, srun --ntasks)")
    args.distributed = args.world_size > 1
    use_cuda = torch.device(args.device).type == 'cuda'
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no usable CUDA GPU; pass --device cpu to run "
                        f"on the CPU")
    # one GPU bound to each task (CUDA_VISIBLE_DEVICES of one device, e.g. srun --gpus-per-task=1): it is
    # device 0 of the task, whatever its local rank
    args.gpu = local_rank if use_cuda and torch.cuda.device_count() > 1 else 0
    if use_cuda and launched:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    if args.rank == 0:
        print(describe_device(args.device), flush=True)
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
    global _store
    run = [os.urandom(8).hex() if args.rank == 0 else None]  # keys of this run only: a file:// store may be reused
    dist.broadcast_object_list(run, src=0)
    _store = dist.PrefixStore(f'ttt_mae/{run[0]}/', dist.distributed_c10d._get_default_store())
    wait_for_all()
    setup_for_distributed(args.rank == 0)


def describe_device(device):
    """One line: the device, its GPU's name, torch and CUDA versions."""
    device = torch.device(device)
    where = 'CPU' if device.type == 'cpu' else f"{device} ({torch.cuda.get_device_name(device)})"
    return f"| device {where}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


# The processes' rendezvous store: a process that stops on an error says so there, and the others,
# waiting for it at a synchronisation point or checking at a flush, stop at once instead of at the
# collective's timeout.
_store = None
_waits = 0


def report_failure(message):
    if _store is not None:
        try:
            if not _store.check(['failed']):  # the first failure is the one to report
                _store.set('failed', f"rank {get_rank()}: {message}")
        except RuntimeError:  # the store went with a process that stopped first
            pass


def raise_if_another_failed():
    if _store is None:
        return
    try:
        failed = _store.check(['failed']) and _store.get('failed').decode()
    except RuntimeError:  # the store's host (rank 0) is gone
        failed = 'rank 0: stopped'
    if failed:
        raise UserError(f"another process stopped ({failed}); this one stops too")


def wait_for_all():
    """Every process reaches this point (as a barrier), unless one reports a failure first."""
    global _waits
    if _store is None:
        return
    _waits += 1
    key = f'arrived/{_waits}'
    _store.add(key, 1)
    while True:
        raise_if_another_failed()
        if _store.add(key, 0) >= dist.get_world_size():
            return
        time.sleep(0.05)


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
    wait_for_all()


def broadcast_object(objects):
    """Replace the list `objects` in place by rank 0's."""
    if is_dist_avail_and_initialized():
        wait_for_all()
        dist.broadcast_object_list(objects, src=0)


def all_reduce_mean(x):
    """Average a Python number over processes."""
    if not is_dist_avail_and_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def destroy():
    global _store
    if is_dist_avail_and_initialized():
        wait_for_all()  # rank 0 hosts the store: it leaves last
        dist.destroy_process_group()
    _store = None


def wrap_model(model, args, device):
    """(model to train, the bare model): DistributedDataParallel when several processes run."""
    if not args.distributed:
        return model, model
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    return ddp, ddp.module
