"""Process-group set-up.

Rank, world size and local rank come from the environment: torchrun and torch.distributed.launch set
RANK / WORLD_SIZE / LOCAL_RANK (launch also passes --local-rank), and a SLURM allocation sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. NCCL on GPUs, Gloo on CPU.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(*names):
    for name in names:
        if os.environ.get(name, '') != '':
            return int(os.environ[name])
    return None


def init_distributed(local_rank_flag=None, device=None):
    """Read the launcher's environment, pick the device, and join the process group when world size > 1."""
    world_size = _env_int('WORLD_SIZE', 'SLURM_NTASKS') or 1
    rank = _env_int('RANK', 'SLURM_PROCID') or 0
    local_rank = _env_int('LOCAL_RANK', 'SLURM_LOCALID')
    if local_rank is None:
        local_rank = local_rank_flag if local_rank_flag is not None else 0
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith('cuda')
    if device is not None and not (use_cuda or str(device) == 'cpu'):
        raise UserError(f"--device '{device}' is not a device this code runs on; use --device cuda or --device cpu")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but this machine has no CUDA device that PyTorch can use "
                        f"(torch.cuda.is_available() is False); use --device cpu, or leave --device out")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                        f"launch at most that many processes per node")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if env.distributed and not dist.is_initialized():
        # SLURM's srun sets no rendezvous address; a single-node allocation can use the defaults.
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', '29500')
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo', rank=rank, world_size=world_size)
    return env


def all_reduce_sum(tensor, env):
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_batches(tensor):
    """Every process's `tensor` (same shape on each), concatenated along dim 0 in rank order; `tensor` itself
    outside a process group. Called inside a forward, where the distiller has no DistEnv, so it reads the
    process group directly. No gradient flows back through the gathered copies."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def all_reduce_mean(tensor):
    """The mean of `tensor` over the processes (in place), `tensor` itself outside a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def check_replicas(module, env):
    """Raise if the ranks' copies of `module` differ: DDP keeps them equal, so a difference is a bug."""
    if not env.distributed:
        return
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in module.parameters()] +
                                  [p.double().square().sum() for p in module.parameters()])
        gathered = [torch.empty_like(fingerprint) for _ in range(env.world_size)]
        dist.all_gather(gathered, fingerprint)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f'the weights of rank {rank} differ from those of rank 0')


def distribute_bn(modules, env, mode):
    """BatchNorm running statistics made the same on every rank: 'reduce' averages them, 'broadcast' copies
    rank 0's, '' leaves each rank its own (the reference's --dist-bn, with timm's distribute_bn)."""
    if not env.distributed or not mode:
        return
    from timm.utils import distribute_bn as timm_distribute_bn
    for module in modules:
        timm_distribute_bn(module, env.world_size, reduce=mode == 'reduce')


def broadcast_object(obj, env):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(env):
    if env.distributed:
        dist.barrier()


def cleanup(env):
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
