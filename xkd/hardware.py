"""What the CPU does natively, so that a run can say at its start when a precision will be slow there.

bfloat16 on a CPU is fast only with native instructions (x86: AVX512-BF16 or AMX; Arm: the BF16 extension).
Without them oneDNN emulates it in float32 and converts every tensor on the way: measured on a 2-core x86
without them, resnet18 <- swin_tiny at 224 px, batch 8, took 14.9 s per `--amp` step against 1.3 s in float32.
"""
import logging
import platform

import torch

_logger = logging.getLogger(__name__)

# /proc/cpuinfo names: x86 `flags` (AVX512-BF16, AMX-BF16) and Arm `Features` (FEAT_BF16).
BFLOAT16_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')


def cpu_flags(path='/proc/cpuinfo'):
    """The first CPU's feature flags (x86 `flags`, Arm `Features`) as a set; None where the file is unreadable."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        return None
    return None


def native_bfloat16(flags=None):
    """True when the CPU computes bfloat16 natively, False when it emulates it, None when we cannot tell.

    `flags` defaults to `cpu_flags()`; without /proc/cpuinfo (macOS, Windows) x86 asks PyTorch's own CPU
    probe (cpuinfo), and other machines are left undecided rather than warned about wrongly.
    """
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        return any(flag in flags for flag in BFLOAT16_FLAGS)
    if platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686'):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return None


def uses_bfloat16_on_cpu(args, device):
    """Whether the run computes in bfloat16 on a CPU: `--amp` with that dtype, or a bfloat16 teacher."""
    if device.type != 'cpu':
        return False
    amp = args.amp and args.amp_dtype == 'bfloat16'
    teacher = getattr(args, 'teacher_dtype', None) == 'bfloat16' and args.distiller != 'vanilla'
    return amp or teacher


def warn_if_bfloat16_emulated(args, device, flags=None):
    """One warning line at the start of a run that will compute in bfloat16 on a CPU that emulates it."""
    if uses_bfloat16_on_cpu(args, device) and native_bfloat16(flags) is False:
        _logger.warning('This CPU has no native bfloat16 (no AVX512-BF16, AMX or Arm BF16): bfloat16 is emulated, '
                        'so this run will be slower than in float32, often 10x per step; float32 is faster here '
                        '(leave out --amp and --teacher-dtype bfloat16)')
        return True
    return False
