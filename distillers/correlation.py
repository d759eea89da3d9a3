"""Peng et al., ICCV 2019: Correlation Congruence (CC), as the OFA and RSD code bases compute it.

Each side's pooled embedding goes through its own Linear to a common width; the loss multiplies the
absolute embedding differences of consecutive samples in the batch, so it rewards a student whose errors
against the teacher are uncorrelated from one sample to the next.
"""
import torch
import torch.nn as nn

from custom_forward import embedding_dim, forward_features

from ._base import Distiller, at_least_float32
from .registry import register_distiller


def cc_loss(embedding_student, embedding_teacher):
    """With d = |f_s - f_t| [B, D] (f = each side's projected embedding):

        mean over i = 1..B-1 of sum_j d[i, j] * d[i + 1, j]

    Consecutive samples of the batch only, as the reference computes it (not all pairs). Both inputs carry
    gradients: the teacher's embedding is fixed, but its Linear is trained. Needs B >= 2.
    """
    delta = (at_least_float32(embedding_student) - at_least_float32(embedding_teacher)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def check_batch_size(args, method):
    batch_size = getattr(args, 'batch_size', None)
    if batch_size is not None and batch_size < 2:
        raise ValueError(f"{method} compares the samples of a batch with each other and needs --batch-size >= 2 "
                         f"per process, got {batch_size}")


@register_distiller
class Correlation(Distiller):
    """loss_gt + kd_loss_weight * correlation_scale * cc_loss(Linear_s(e_s), Linear_t(e_t))."""
    teacher_reads = ('embedding',)

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        # PyTorch's default Linear initialisation, as in the reference (which applies no init of its own).
        self.embed_student = nn.Linear(embedding_dim(student), args.correlation_feat_dim)
        self.embed_teacher = nn.Linear(embedding_dim(teacher), args.correlation_feat_dim)

    @classmethod
    def check_args(cls, args):
        if args.correlation_feat_dim < 1:
            raise ValueError(f"--correlation-feat-dim must be a positive integer, got {args.correlation_feat_dim}")
        check_batch_size(args, 'correlation')

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--correlation-scale', type=float, default=0.02, help='weight of the CC loss')
        parser.add_argument('--correlation-feat-dim', type=int, default=128,
                            help='width both embeddings are projected to')

    def forward(self, image, label, epoch=0):
        _, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        loss = cc_loss(self.embed_student(student_features[-1]), self.embed_teacher(teacher_features[-1]))
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': self.args.kd_loss_weight * self.args.correlation_scale * loss}
