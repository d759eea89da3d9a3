"""Xu et al.: Heterogeneous Complementary Distillation (HCD); docs/methods/hcd.md.

Only the abstract is public. Each chosen student stage is projected to a vector u_k; the Complementary
Feature Mapper (CFM) reads u_k beside the teacher's pooled embedding t and gives n*K shared logits, split
into n sub-logits. Sub-logit Decoupled Distillation fuses each with the teacher's logits and distils the
student's final logits from every fused sub-logit; the fused sub-logits are also trained on the labels
and kept apart from one another by an orthogonality loss on their non-target classes.

The choices the abstract leaves open are flags (README, section "HCD"): the CFM's hidden layer
(`--hcd-cfm-hidden`), the fusion (a plain sum f_i = sub_i + z_t), detaching the fused logits as KL
targets (`--hcd-detach-target`), and the orthogonality loss's form and threshold (`--hcd-ortho-form`,
`--hcd-ortho-tau`).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_forward import (embedding_dim, feature_format, forward_features, num_prefix_tokens, stage_info,
                            strip_prefix_tokens)

from ._base import Distiller, hard_target
from .kd import kd_loss
from .ofa import init_branch_weights, map_branch, run_map_branch
from .registry import register_distiller

ORTHO_FORMS = ('hinge', 'frobenius')


def orthogonality_loss(fused_sublogits, target, tau, form='hinge'):
    """Pairwise similarity of the n fused sub-logits [B, n, K] on their K - 1 non-target classes.

    The target column is removed (gathered out), not masked with a large negative number: masking would
    leave a constant column that dominates the norm and kills the gradient. Each sub-logit vector is
    L2-normalised and G = V V^T (n x n per sample). `hinge`: mean over samples and pairs i != j of
    relu(G_ij - tau)^2, so pairs already less similar than tau are left alone; `frobenius`: mean of G_ij^2.
    """
    if form not in ORTHO_FORMS:
        raise ValueError(f"orthogonality_loss form must be one of {', '.join(ORTHO_FORMS)}; got '{form}'")
    batch_size, num_sub, num_classes = fused_sublogits.shape
    columns = torch.arange(num_classes - 1, device=fused_sublogits.device)
    non_target = columns + (columns >= target[:, None]).long()  # [B, K-1]: every class but the target
    non_target = non_target[:, None, :].expand(batch_size, num_sub, num_classes - 1)
    # Cosines near tau decide the hinge: the Gram matrices are formed in float32 even under AMP.
    with torch.autocast(fused_sublogits.device.type, enabled=False):
        fused_sublogits = fused_sublogits.to(torch.promote_types(fused_sublogits.dtype, torch.float32))
        vectors = F.normalize(fused_sublogits.gather(-1, non_target), dim=-1)
        gram = vectors @ vectors.transpose(1, 2)
    terms = F.relu(gram - tau).square() if form == 'hinge' else gram.square()
    # A multiplicative mask rather than boolean indexing, which would wait for the device.
    off_diagonal = 1 - torch.eye(num_sub, dtype=terms.dtype, device=terms.device)
    return (terms * off_diagonal).sum() / (batch_size * num_sub * (num_sub - 1))


def sublogit_kd_loss(logits_student, fused_sublogits, temperature=1.0):
    """mean_i T^2 KL(softmax(f_i / T) || softmax(z_s / T)), each KL averaged over the batch.

    The student's logits [B, K] are distilled from every fused sub-logit [B, n, K]; batch-averaging
    over the B*n pairs is the mean over i of the batch means.
    """
    batch_size, num_sub, num_classes = fused_sublogits.shape
    repeated_student = logits_student[:, None].expand(batch_size, num_sub, num_classes)
    return kd_loss(repeated_student.reshape(-1, num_classes), fused_sublogits.reshape(-1, num_classes), temperature)


class TokenProjector(nn.Module):
    """u_k of a token stage: prefix tokens stripped, LayerNorm, Linear to D*, mean over the patch tokens."""

    def __init__(self, num_prefix, stage_dim, out_dim):
        super().__init__()
        self.num_prefix = num_prefix
        self.norm = nn.LayerNorm(stage_dim)
        self.proj = nn.Linear(stage_dim, out_dim)

    def forward(self, tokens):
        return self.proj(self.norm(strip_prefix_tokens(tokens, self.num_prefix))).mean(dim=1)


def map_projector(in_chans, stage, out_dim):
    """u_k of a map stage: OFA's map branch without its classifier (separable downsampling for k < 4, a
    1x1 conv for k = 4, to D*), then global average pooling and flatten."""
    return map_branch(in_chans, stage, out_dim, num_classes=1)[:-1]


def feature_mapper(in_dim, out_dim, hidden):
    """The Complementary Feature Mapper: one Linear (the abstract's single FC layer), or, with
    `hidden` > 0, Linear - ReLU - Linear (our reading)."""
    if hidden:
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    return nn.Linear(in_dim, out_dim)


@register_distiller
class HCD(Distiller):
    """loss_gt + kd_loss_weight * KD(z_s, z_t) + sum over stages k of
    (hcd_kl_weight * sub-logit KL + hcd_ce_weight * sub-logit CE + hcd_ortho_weight * orthogonality_loss)."""
    teacher_reads = ('logits', 'embedding')
    reads_shared_flags = ('kd_loss_weight', 'kd_temperature')

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        self.stages = list(args.hcd_stages)
        self.num_sub = args.hcd_n
        self.num_classes = args.num_classes
        student_dim, teacher_dim = embedding_dim(student), embedding_dim(teacher)
        projection_dim = max(student_dim, teacher_dim)  # D*, as OFA's branches
        self.projectors = nn.ModuleDict()
        self.feature_mappers = nn.ModuleDict()
        self.map_student = feature_format(student) == 'map'
        for stage in self.stages:
            shape = stage_info(student, stage, args.input_size)
            if self.map_student:
                projector = map_projector(shape[0], stage, projection_dim)
            else:
                projector = TokenProjector(num_prefix_tokens(student), shape[1], projection_dim)
            mapper = feature_mapper(projection_dim + teacher_dim, self.num_sub * self.num_classes,
                                    args.hcd_cfm_hidden)
            init_branch_weights(projector)
            init_branch_weights(mapper)
            self.projectors[f'stage{stage}'] = projector
            self.feature_mappers[f'stage{stage}'] = mapper

    @classmethod
    def check_args(cls, args):
        stages = list(args.hcd_stages)
        if not stages or any(stage not in (1, 2, 3, 4) for stage in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"--hcd-stages takes distinct stages among 1 2 3 4; got {stages}")
        if args.hcd_n < 2:
            raise ValueError(f"--hcd-n (sub-logits per stage) must be an integer >= 2, got {args.hcd_n}")
        if not -1 <= args.hcd_ortho_tau < 1:
            raise ValueError(f"--hcd-ortho-tau (a cosine threshold) must be in [-1, 1), got {args.hcd_ortho_tau}")
        if args.hcd_cfm_hidden < 0:
            raise ValueError(f"--hcd-cfm-hidden must be 0 (a single FC layer) or a positive width, "
                             f"got {args.hcd_cfm_hidden}")
        if args.hcd_ortho_form not in ORTHO_FORMS:  # a YAML config bypasses argparse's choices
            raise ValueError(f"--hcd-ortho-form must be one of {', '.join(ORTHO_FORMS)}; got '{args.hcd_ortho_form}'")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--hcd-stages', type=int, nargs='+', default=[1, 2, 3, 4],
                            help='student stages (1..4) that get a projector and a Complementary Feature Mapper')
        parser.add_argument('--hcd-n', type=int, default=4, help='number of sub-logits per stage')
        parser.add_argument('--hcd-cfm-hidden', type=int, default=0,
                            help='hidden width of the CFM: 0 = a single FC layer (the abstract), > 0 = '
                                 'Linear-ReLU-Linear (our reading)')
        parser.add_argument('--hcd-kl-weight', type=float, default=1.0, help='weight of the sub-logit KL loss')
        parser.add_argument('--hcd-ce-weight', type=float, default=1.0, help='weight of the sub-logit CE loss')
        parser.add_argument('--hcd-ortho-weight', type=float, default=1.0, help='weight of the orthogonality loss')
        parser.add_argument('--hcd-ortho-tau', type=float, default=0.5,
                            help='cosine threshold of the hinge orthogonality loss, in [-1, 1) (our reading)')
        parser.add_argument('--hcd-ortho-form', default='hinge', choices=ORTHO_FORMS,
                            help='hinge: relu(G_ij - tau)^2; frobenius: G_ij^2 (our reading)')
        parser.add_argument('--hcd-detach-target', action=argparse.BooleanOptionalAction, default=True,
                            help='detach the fused sub-logits where they are KL targets, so the KL trains '
                                 'only the student (our reading)')

    def sublogits(self, stage, stage_feature, teacher_embedding):
        """The n sub-logits [B, n, K] of stage k: CFM_k(concat(u_k, t)) reshaped from [B, n*K]."""
        key = f'stage{stage}'
        projector = self.projectors[key]
        projected = run_map_branch(projector, stage_feature) if self.map_student else projector(stage_feature)
        shared_logits = self.feature_mappers[key](torch.cat([projected, teacher_embedding], dim=1))
        return shared_logits.reshape(-1, self.num_sub, self.num_classes)

    def forward(self, image, label, epoch=0):
        args = self.args
        logits_teacher, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        teacher_embedding = teacher_features[-1]  # computed under no_grad: already detached
        target = hard_target(label)
        repeated_label = label.repeat_interleave(self.num_sub, dim=0)  # row b*n + i is sample b's label
        loss_kl = loss_ce = loss_ortho = 0.
        for stage in self.stages:
            fused = self.sublogits(stage, student_features[stage - 1], teacher_embedding) + logits_teacher[:, None]
            kl_target = fused.detach() if args.hcd_detach_target else fused
            loss_kl = loss_kl + sublogit_kd_loss(logits_student, kl_target, args.kd_temperature)
            # The run's criterion (label smoothing, or soft targets under mixup) on each fused sub-logit;
            # the batch mean over the B*n rows is the mean over i.
            loss_ce = loss_ce + self.criterion(fused.reshape(-1, self.num_classes), repeated_label)
            loss_ortho = loss_ortho + orthogonality_loss(fused, target, args.hcd_ortho_tau, args.hcd_ortho_form)
        loss_kd = kd_loss(logits_student, logits_teacher, args.kd_temperature)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': args.kd_loss_weight * loss_kd,
                                'loss_hcd_kl': args.hcd_kl_weight * loss_kl,
                                'loss_hcd_ce': args.hcd_ce_weight * loss_ce,
                                'loss_hcd_ortho': args.hcd_ortho_weight * loss_ortho}
