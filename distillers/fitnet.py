"""Romero et al., ICLR 2015: FitNets (hints), across architectures as in the RSD code base.

At each chosen stage an aligner maps the student's stage feature onto the teacher's, and the mean squared
error between the two is the hint loss. Features may be maps (CNNs) or tokens (ViT, Swin, MLPs); prefix
tokens (class, distillation, register) are dropped on both sides and the patch tokens are laid out on their
grid, so every pairing reduces to one of three aligners between grids:

- same grid: a per-position linear map of the channels (a 1x1 convolution);
- teacher grid s times finer: a per-position linear map to s*s*C_t channels, un-patchified to the s x s
  positions each student position covers (the reference's Linear + unpatchify, or its conv against the
  teacher's merged patches);
- teacher grid s times coarser: a patch embedding, a stride-s s x s convolution (the reference's PatchEmbed,
  or its patch merging + Linear for token students).
A map student with a map teacher, or grids that are no integer multiple of each other, get the 1x1
convolution followed by resampling to the teacher's grid (average pooling down, bilinear up).
"""
import torch.nn as nn
import torch.nn.functional as F

from custom_forward import (feature_format, forward_features, map_to_tokens, num_prefix_tokens, stage_info,
                            strip_prefix_tokens, tokens_to_map)

from ._base import Distiller, at_least_float32
from .registry import register_distiller

# The RSD code base multiplies the summed hint losses by 0.1 on top of --fitnet-loss-weight; kept so that its
# command lines give its loss.
REFERENCE_SCALE = 0.1


def fitnet_loss(student_aligned, teacher_feature):
    """mean over all elements of (aligner(F_s) - F_t)^2, F_t the teacher's stage feature without its prefix
    tokens (in the teacher's own layout, which the aligner's output has). The teacher feature is a target
    (no gradient)."""
    return F.mse_loss(at_least_float32(student_aligned), at_least_float32(teacher_feature.detach()))


def _grid_and_channels(shape, feature_format_, num_prefix):
    """(side of the square grid, channels) of a stage shape (C, H, W) or (L, D)."""
    if feature_format_ == 'map':
        channels, height, width = shape
        if height != width:
            raise ValueError(f"FitNet aligners need square feature maps, got {height}x{width}")
        return height, channels
    num_tokens, channels = shape
    side = round((num_tokens - num_prefix) ** 0.5)
    if side * side != num_tokens - num_prefix:
        raise ValueError(f"FitNet aligners need a square grid of patch tokens, got {num_tokens - num_prefix}")
    return side, channels


class Aligner(nn.Module):
    """Student stage feature (with its prefix tokens, if any) -> the teacher's stage feature without prefix tokens.

    The kind of aligner follows from the two grids (see the module docstring): 'same', 'unpatchify' (teacher
    s times finer), 'patchify' (teacher s times coarser) or 'resample'.
    """

    def __init__(self, student_shape, student_format, student_prefix, teacher_shape, teacher_format,
                 teacher_prefix):
        super().__init__()
        self.student_format, self.student_prefix, self.teacher_format = student_format, student_prefix, teacher_format
        student_grid, student_channels = _grid_and_channels(student_shape, student_format, student_prefix)
        self.teacher_grid, teacher_channels = _grid_and_channels(teacher_shape, teacher_format, teacher_prefix)
        has_tokens = 'tokens' in (student_format, teacher_format)
        self.scale = 1
        if student_grid == self.teacher_grid:
            self.kind = 'same'
            self.projection = nn.Conv2d(student_channels, teacher_channels, 1)
        elif has_tokens and self.teacher_grid % student_grid == 0:
            self.kind, self.scale = 'unpatchify', self.teacher_grid // student_grid
            self.projection = nn.Conv2d(student_channels, teacher_channels * self.scale ** 2, 1)
        elif has_tokens and student_grid % self.teacher_grid == 0:
            self.kind, self.scale = 'patchify', student_grid // self.teacher_grid
            self.projection = nn.Conv2d(student_channels, teacher_channels, self.scale, stride=self.scale)
        else:
            self.kind = 'resample'
            self.projection = nn.Conv2d(student_channels, teacher_channels, 1)
        # The reference's initialisation: its token students' projections are Linears (truncated normal, std
        # 0.02), its map students' are convolutions (Kaiming, fan-out); biases start at zero.
        if student_format == 'tokens':
            nn.init.trunc_normal_(self.projection.weight, std=0.02)
        else:
            nn.init.kaiming_normal_(self.projection.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.projection.bias)

    def forward(self, student_feature):
        if self.student_format == 'tokens':
            student_feature = tokens_to_map(student_feature, self.student_prefix)
        aligned = self.projection(student_feature)
        if self.kind == 'unpatchify':
            # Channel (c, i, j) of a student position becomes channel c at offset (i, j) of its s x s patch.
            aligned = F.pixel_shuffle(aligned, self.scale)
        elif self.kind == 'resample':
            size = (self.teacher_grid, self.teacher_grid)
            aligned = (F.adaptive_avg_pool2d(aligned, size) if aligned.shape[-1] > self.teacher_grid else
                       F.interpolate(aligned, size=size, mode='bilinear', align_corners=False))
        return map_to_tokens(aligned) if self.teacher_format == 'tokens' else aligned


def build_aligner(student, teacher, stage, input_size=None):
    """The aligner of stage `stage` (1..4) for this student and teacher (shapes from `stage_info`)."""
    return Aligner(stage_info(student, stage, input_size), feature_format(student), num_prefix_tokens(student),
                   stage_info(teacher, stage, input_size), feature_format(teacher), num_prefix_tokens(teacher))


@register_distiller
class FitNet(Distiller):
    """loss_gt + 0.1 * fitnet_loss_weight * sum over the chosen stages k of fitnet_loss(aligner_k(F_s,k), F_t,k)."""
    teacher_reads = None  # the stage maps
    reads_shared_flags = ()

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        self.stages = list(args.fitnet_stage)
        # The teacher's prefix tokens are dropped from its token features (None for a map teacher).
        self.teacher_prefix = num_prefix_tokens(teacher) if feature_format(teacher) == 'tokens' else None
        self.aligners = nn.ModuleDict({f'stage{stage}': build_aligner(student, teacher, stage, args.input_size)
                                       for stage in self.stages})

    @classmethod
    def check_args(cls, args):
        stages = list(args.fitnet_stage)
        if any(stage not in (1, 2, 3, 4) for stage in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"--fitnet-stage takes distinct stages among 1 2 3 4; got {stages}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--fitnet-stage', type=int, nargs='+', default=[1, 2, 3, 4],
                            help='stages (1..4) whose features the student matches')
        parser.add_argument('--fitnet-loss-weight', type=float, default=1.0,
                            help='weight of the hint losses (times 0.1, as in the RSD code base)')

    def forward(self, image, label, epoch=0):
        _, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        loss_fitnet = 0.
        for stage in self.stages:
            teacher_feature = teacher_features[stage - 1]
            if self.teacher_prefix is not None:
                teacher_feature = strip_prefix_tokens(teacher_feature, self.teacher_prefix)
            aligned = self.aligners[f'stage{stage}'](student_features[stage - 1])
            loss_fitnet = loss_fitnet + fitnet_loss(aligned, teacher_feature)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_fitnet': REFERENCE_SCALE * self.args.fitnet_loss_weight * loss_fitnet}
