"""bfloat16 detection: CPU flags read from /proc/cpuinfo, and the one-line warning at the start of train.py."""
import argparse

import pytest
import torch

import train
from xkd import hardware

FAST = ['--dataset', 'fake', '--fake-samples', '16', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--model', 'demo_resnet_student', '--distiller', 'vanilla']
WARNING = 'This CPU has no native bfloat16'

X86_WITHOUT = 'flags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f avx512bw\n'
X86_AVX512_BF16 = 'flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n'
X86_AMX = 'flags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16 amx_int8\n'
ARM_BF16 = 'processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n'
ARM_WITHOUT = 'processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n'


@pytest.mark.parametrize('cpuinfo, native', [(X86_WITHOUT, False), (X86_AVX512_BF16, True), (X86_AMX, True),
                                             (ARM_BF16, True), (ARM_WITHOUT, False)])
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, cpuinfo, native):
    path = tmp_path / 'cpuinfo'
    path.write_text('processor\t: 0\nvendor_id\t: Some\nmodel name\t: Some CPU\n' + cpuinfo + '\nprocessor\t: 1\n')
    flags = hardware.cpu_flags(str(path))
    assert flags and hardware.native_bfloat16(flags) is native


def test_without_cpuinfo_x86_asks_torch_and_other_machines_stay_undecided(monkeypatch, tmp_path):
    assert hardware.cpu_flags(str(tmp_path / 'missing')) is None
    monkeypatch.setattr(hardware, 'cpu_flags', lambda: None)
    monkeypatch.setattr(hardware.platform, 'machine', lambda: 'arm64')
    assert hardware.native_bfloat16() is None
    monkeypatch.setattr(hardware.platform, 'machine', lambda: 'x86_64')
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert hardware.native_bfloat16() is True


def run_args(**overrides):
    values = dict(amp=False, amp_dtype='float16', teacher_dtype=None, distiller='kd')
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize('overrides, device, warned', [
    (dict(amp=True, amp_dtype='bfloat16'), 'cpu', True),
    (dict(teacher_dtype='bfloat16'), 'cpu', True),  # a bfloat16 teacher without --amp
    (dict(teacher_dtype='bfloat16', distiller='vanilla'), 'cpu', False),  # no teacher is built
    (dict(), 'cpu', False),
    (dict(amp=True, amp_dtype='bfloat16'), 'cuda', False),
])
def test_which_runs_are_warned_about(overrides, device, warned):
    without = {'avx2', 'fma'}
    assert hardware.warn_if_bfloat16_emulated(run_args(**overrides), torch.device(device), without) is warned
    assert not hardware.warn_if_bfloat16_emulated(run_args(**overrides), torch.device(device), {'amx_bf16'})


@pytest.mark.parametrize('flags, warned', [({'avx2', 'fma'}, True), ({'avx2', 'avx512_bf16'}, False)])
def test_train_warns_in_one_line_at_the_start(monkeypatch, tmp_path, capsys, flags, warned):
    monkeypatch.setattr(hardware, 'cpu_flags', lambda: flags)
    train.main(FAST + ['--amp', '--output', str(tmp_path), '--experiment', 'amp'])
    lines = (tmp_path / 'amp' / 'log.txt').read_text().splitlines()
    warnings = [i for i, line in enumerate(lines) if WARNING in line]
    if not warned:
        assert warnings == [] and WARNING not in capsys.readouterr().out
        return
    assert len(warnings) == 1 and ' WARNING ' in lines[warnings[0]]
    first_step = next(i for i, line in enumerate(lines) if 'Train: ' in line)
    assert warnings[0] < first_step  # said before any step
    assert WARNING in capsys.readouterr().out
