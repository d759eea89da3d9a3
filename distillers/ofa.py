"""Hao et al., NeurIPS 2023: One-for-All knowledge distillation (OFA); docs/methods/ofa.md.

Intermediate student features are not matched to teacher features (their spaces differ across
architectures); instead each chosen student stage gets a branch h_k that predicts logits, and every set
of logits is distilled from the teacher's logits with the OFA loss.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block

from custom_forward import (embedding_dim, feature_format, forward_features, num_prefix_tokens, split_prefix_tokens,
                            stage_info, tokens_to_map)

from ._base import Distiller, hard_target
from .registry import register_distiller

# Token branches merge patches down to this grid, the final grid of the papers' models at 224 px.
FINAL_GRID = 7
BRANCH_HEADS = 4


def ofa_loss(logits_student, logits_teacher, target_mask, eps, temperature=1.):
    """mean_b sum_c -w_c * log_softmax(z_s / T)_c with w = (p_t + m)^eps - m, m the one-hot target mask.

    Off the target w_c = p_t,c^eps; on it (1 + p_t,y)^eps - 1, so eps > 1 strengthens the target class
    when the teacher is unsure. No T^2 factor, as in the reference.
    """
    log_p_student = F.log_softmax(logits_student / temperature, dim=-1)
    p_teacher = F.softmax(logits_teacher / temperature, dim=-1)
    weight = (p_teacher + target_mask) ** eps - target_mask
    return (-weight * log_p_student).sum(dim=-1).mean()


class SepConv(nn.Sequential):
    """Depthwise-separable downsampling block of the reference: dw3x3/2, pw1x1, BN, ReLU, dw3x3, pw1x1, BN, ReLU."""

    def __init__(self, in_chans, out_chans):
        super().__init__(
            nn.Conv2d(in_chans, in_chans, 3, stride=2, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, in_chans, 1, bias=False),
            nn.BatchNorm2d(in_chans),
            nn.ReLU(),
            nn.Conv2d(in_chans, in_chans, 3, stride=1, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, out_chans, 1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(),
        )


def map_branch(in_chans, stage, branch_dim, num_classes):
    """Branch for a map (CNN) student: stage k < 4 gets 4 - k SepConvs doubling the channels, the last one
    giving D*; stage 4 a 1x1 conv to D*. Then global average pool and Linear(D*, K)."""
    if stage < 4:
        num_blocks = 4 - stage
        blocks = [SepConv(in_chans * 2 ** i, branch_dim if i == num_blocks - 1 else in_chans * 2 ** (i + 1))
                  for i in range(num_blocks)]
    else:
        blocks = [nn.Conv2d(in_chans, branch_dim, 1)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(branch_dim, num_classes))


def run_map_branch(branch, feature):
    """A map branch, in float32 on CPU even under bfloat16 autocast.

    oneDNN's bfloat16 depthwise convolutions are slower than its float32 ones: the four ResNet18 branches
    took 116 ms forward and backward at batch 8 under autocast against 73 ms in float32 on the CPU of the
    development machine. Elsewhere the branch follows autocast.
    """
    if feature.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        with torch.autocast('cpu', enabled=False):
            return branch(feature.float())
    return branch(feature)


def num_mergers(grid):
    """2x2 patch mergings (odd grids padded, as timm does) until the grid is at most FINAL_GRID.

    At 224 px this is the reference's count (56 -> 3, 28 -> 2, 14 -> 1, 7 -> 0); at small input sizes
    the grid may already be at or below 7, and then there is none.
    """
    count = 0
    while grid > FINAL_GRID:
        grid = math.ceil(grid / 2)
        count += 1
    return count


class TokenBranch(nn.Module):
    """Branch for a token student: patch merging to a 7x7 grid, max(4 - k, 1) transformer blocks,
    the class token (or the token mean when there is none), Linear(D_s, K).

    Prefix tokens are set aside while the patch tokens are merged and put back before the blocks.
    The first merger maps to the student's embedding dim D_s with GELU, later ones keep D_s and the last
    of several has no activation (a single merger keeps its GELU, as in the reference). When no merging
    is needed but the stage dim differs from D_s, a merger without the 2x2 gather (LayerNorm, Linear, GELU)
    maps the tokens to D_s.
    """

    def __init__(self, num_prefix, grid, stage_dim, embed_dim, stage, num_classes):
        super().__init__()
        if num_prefix and stage_dim != embed_dim:
            raise ValueError(f"OFA token branch: a student with prefix tokens needs stage {stage} features of its "
                             f"embedding dim {embed_dim}, got {stage_dim}")
        self.num_prefix = num_prefix
        count = num_mergers(grid)
        mergers = []
        for i in range(count):
            activation = nn.GELU() if i == 0 or i < count - 1 else nn.Identity()
            mergers.append(nn.Sequential(PatchMerging(stage_dim if i == 0 else embed_dim, embed_dim), activation))
        if not count and stage_dim != embed_dim:
            mergers.append(nn.Sequential(nn.LayerNorm(stage_dim), nn.Linear(stage_dim, embed_dim, bias=False),
                                         nn.GELU()))
        self.mergers = nn.Sequential(*mergers)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads=BRANCH_HEADS) for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens):
        prefix, _ = split_prefix_tokens(tokens, self.num_prefix)
        patch_grid = tokens_to_map(tokens, self.num_prefix).permute(0, 2, 3, 1)  # NHWC, as PatchMerging takes it
        merged = self.mergers(patch_grid).flatten(1, 2)
        if self.num_prefix:
            merged = self.blocks(torch.cat([prefix, merged], dim=1))
            return self.head(merged[:, 0])
        return self.head(self.blocks(merged).mean(dim=1))


def init_branch_weights(branch):
    """The reference's initialisation: Kaiming (fan-out) for convolutions, truncated normal 0.02 for Linears."""
    for module in branch.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)


@register_distiller
class OFA(Distiller):
    """loss_gt + kd_loss_weight * ofa_loss(z_s, z_t, eps_last)
    + ofa_loss_weight * sum over stages k of ofa_loss(h_k(F_k), z_t, eps_k)."""

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        self.stages = list(args.ofa_stage)
        eps = list(args.ofa_eps) * (len(self.stages) + 1) if len(args.ofa_eps) == 1 else list(args.ofa_eps)
        self.stage_eps, self.final_eps = eps[:-1], eps[-1]

        student_dim, teacher_dim = embedding_dim(student), embedding_dim(teacher)
        self.branches = nn.ModuleDict()
        self.map_student = feature_format(student) == 'map'
        for stage in self.stages:
            shape = stage_info(student, stage, args.input_size)
            if self.map_student:
                branch = map_branch(shape[0], stage, max(student_dim, teacher_dim), args.num_classes)
            else:
                num_prefix = num_prefix_tokens(student)
                grid = math.isqrt(shape[0] - num_prefix)
                if grid * grid != shape[0] - num_prefix:
                    raise ValueError(f"OFA token branch needs a square patch grid; stage {stage} has "
                                     f"{shape[0] - num_prefix} patch tokens")
                branch = TokenBranch(num_prefix, grid, shape[1], student_dim, stage, args.num_classes)
            init_branch_weights(branch)
            self.branches[f'stage{stage}'] = branch

    @classmethod
    def check_args(cls, args):
        stages = list(args.ofa_stage)
        if any(stage not in (1, 2, 3, 4) for stage in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"--ofa-stage takes distinct stages among 1 2 3 4; got {stages}")
        if len(args.ofa_eps) not in (1, len(stages) + 1):
            raise ValueError(f"--ofa-eps takes one value or len(--ofa-stage) + 1 = {len(stages) + 1} values "
                             f"(one per stage {stages}, then the final logits); got {len(args.ofa_eps)}: "
                             f"{list(args.ofa_eps)}")
        if args.ofa_temperature <= 0:
            raise ValueError(f"--ofa-temperature must be positive, got {args.ofa_temperature}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--ofa-eps', type=float, nargs='+', default=[1.0],
                            help='target-enhancement exponent: one value, or one per stage then one for the '
                                 'final logits (1.5 on ImageNet in the paper)')
        parser.add_argument('--ofa-stage', type=int, nargs='+', default=[1, 2, 3, 4],
                            help='student stages (1..4) that get a logit branch')
        parser.add_argument('--ofa-loss-weight', type=float, default=1.0, help='weight of the branch losses')
        parser.add_argument('--ofa-temperature', type=float, default=1.0, help='temperature of the OFA loss')

    def forward(self, image, label, epoch=0):
        logits_teacher = self.teacher_logits(image)
        logits_student, student_features = forward_features(self.student, image)
        target_mask = torch.zeros_like(logits_teacher).scatter_(-1, hard_target(label)[:, None], 1.0)
        temperature = self.args.ofa_temperature
        loss_ofa = 0.
        for stage, eps in zip(self.stages, self.stage_eps):
            branch, feature = self.branches[f'stage{stage}'], student_features[stage - 1]
            logits_branch = run_map_branch(branch, feature) if self.map_student else branch(feature)
            loss_ofa = loss_ofa + ofa_loss(logits_branch, logits_teacher, target_mask, eps, temperature)
        loss_kd = ofa_loss(logits_student, logits_teacher, target_mask, self.final_eps, temperature)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': self.args.kd_loss_weight * loss_kd,
                                'loss_ofa': self.args.ofa_loss_weight * loss_ofa}
