"""Mixed precision on CPU, a teacher kept in bfloat16, the teacher under inference mode, torch.compile."""

import pytest
import timm
import torch

import distillers
import train
from helpers import summary_rows
from xkd.config import build_parser

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher', '--distiller', 'kd']


def make_distiller(name, teacher_dtype=torch.float32):
    args = build_parser().parse_args(['--distiller', name])
    args.num_classes, args.input_size = 10, (3, 32, 32)
    student = timm.create_model('demo_resnet_student', num_classes=10)
    teacher = timm.create_model('demo_vit_teacher', num_classes=10).to(teacher_dtype)
    return distillers.get_distiller(name)(student, teacher, torch.nn.CrossEntropyLoss(), args)


@pytest.mark.parametrize('teacher_dtype', [torch.float32, torch.bfloat16])
def test_teacher_outputs_are_float32_autograd_tensors(teacher_dtype):
    distiller = make_distiller('kd', teacher_dtype)
    logits, feats = distiller.teacher_features(torch.randn(2, 3, 32, 32))
    for tensor in [logits] + feats:
        assert tensor.dtype == torch.float32 and not tensor.is_inference() and not tensor.requires_grad
    assert distiller.teacher_logits(torch.randn(2, 3, 32, 32)).dtype == torch.float32


def test_bfloat16_teacher_gives_the_float32_teachers_logits_closely():
    distiller = make_distiller('kd')
    image = torch.randn(4, 3, 32, 32)
    reference = distiller.teacher_logits(image)
    distiller.teacher.to(torch.bfloat16)
    assert distiller.teacher_dtype == torch.bfloat16
    assert torch.allclose(distiller.teacher_logits(image), reference, atol=0.1)


def test_amp_bfloat16_and_bfloat16_teacher_train_on_cpu(tmp_path):
    train.main(FAST + ['--amp', '--amp-dtype', 'bfloat16', '--teacher-dtype', 'bfloat16', '--eval-teacher',
                       '--output', str(tmp_path), '--experiment', 'bf16'])
    row = summary_rows(tmp_path / 'bf16')[-1]
    assert float(row['train_loss_kd']) >= 0 and 0 <= float(row['eval_top1']) <= 100
    checkpoint = torch.load(tmp_path / 'bf16' / 'last.pth.tar', weights_only=True)
    assert all(t.dtype != torch.bfloat16 for t in checkpoint['state_dict'].values())  # the student stays fp32


def test_amp_defaults_to_bfloat16_on_cpu(tmp_path):
    train.main(FAST + ['--amp', '--output', str(tmp_path), '--experiment', 'amp'])
    assert 'bfloat16' in (tmp_path / 'amp' / 'args.yaml').read_text()


def test_channels_last(tmp_path):
    train.main(FAST + ['--channels-last', '--output', str(tmp_path), '--experiment', 'cl'])
    assert summary_rows(tmp_path / 'cl')[-1]['eval_top1'] != ''


@pytest.mark.slow
def test_torchcompile_trains(tmp_path):
    train.main(FAST + ['--torchcompile', '--output', str(tmp_path), '--experiment', 'compiled'])
    checkpoint = torch.load(tmp_path / 'compiled' / 'last.pth.tar', weights_only=True)
    assert not any(key.startswith('_orig_mod') for key in checkpoint['state_dict'])


def test_ofa_map_branches_run_in_float32_on_cpu_under_autocast():
    distiller = make_distiller('ofa')
    image, label = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = distiller(image, label)
        branch_logits = distillers.ofa.run_map_branch(distiller.branches['stage1'],
                                                     torch.randn(2, 16, 8, 8, dtype=torch.bfloat16))
    assert branch_logits.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert distiller.branches['stage1'][0][0].weight.grad is not None
