"""Zhang et al., ICCV 2025: Redundancy Suppression Distillation (RSD); docs/methods/rsd.md.

The student's feature goes through a decoupling projector (the paper's AAD module) and is matched to
the teacher's feature through the cross-correlation matrix of the two, standardised over the batch:
C = Z^_t^T Z^_s / B. Diagonal entries are pulled to 1, off-diagonal ones to 0 with weight kappa.

`--rsd-stage -1` matches the pooled embeddings. Stages 1..4 match feature maps, each (channel, position)
a unit: the teacher's map is brought to the student's grid, the student's map goes through a 1x1-conv
projector, and both are flattened to [B, C_t*H*W]. There D reaches 200,704 and the D x D matrix cannot
be formed; `rsd_loss` then uses the equivalent B x B Gram form (`rsd_loss_gram`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_forward import embedding_dim, feature_format, forward_features, num_prefix_tokens, stage_info, tokens_to_map

from ._base import Distiller, at_least_float32
from .registry import register_distiller

STANDARDISE_EPS = 1e-5


def _standardise(features):
    """(x - mean) / (std + 1e-5) per dimension over the batch, with the mean and std; std is biased, as in
    the reference.

    The variance is clamped away from 0 before the square root: a constant dimension then gets a zero
    gradient through its std instead of 0 * inf = NaN (its standardised values are 0 either way).
    (torch.var_mean would do, but its reduction over the batch dimension is several times slower.)
    """
    mean = features.mean(dim=0)
    centred = features - mean
    std = centred.square().mean(dim=0).clamp_min(torch.finfo(features.dtype).tiny).sqrt()
    return centred / (std + STANDARDISE_EPS), mean, std


def _restandardise(features, mean, std):
    """The standardised features again, from the mean and std `_standardise` gave."""
    return (features - mean).div_(std + STANDARDISE_EPS)


def _no_autocast(tensor):
    """The correlations are sums over the batch of products; they are computed in float32 even under AMP."""
    return torch.autocast(tensor.device.type, enabled=False)


def rsd_loss_correlation(student_projected, teacher_embedding, kappa):
    """The loss as written in the paper: forms the D x D correlation matrix. O(B D^2) time, O(D^2) memory."""
    with _no_autocast(student_projected):
        batch_size = student_projected.shape[0]
        teacher_hat, _, _ = _standardise(at_least_float32(teacher_embedding))
        student_hat, _, _ = _standardise(at_least_float32(student_projected))
        correlation = teacher_hat.T @ student_hat / batch_size
        on_diagonal = torch.diagonal(correlation)
        off_diagonal_sq = correlation.pow(2).sum() - on_diagonal.pow(2).sum()
        return (on_diagonal - 1).pow(2).sum() + kappa * off_diagonal_sq


class _GramRSD(torch.autograd.Function):
    """The RSD loss from B x B Gram matrices, with a hand-written backward that keeps memory low.

    Between forward and backward only the inputs, per-dimension moments and B x B matrices are held;
    the backward recomputes the standardised inputs and works in place, so at most about three [B, D]
    tensors exist besides the inputs (autograd would keep about twice as many). The loss is symmetric
    in student and teacher, so the teacher's gradient, when asked for, has the same form.
    """

    @staticmethod
    def forward(ctx, student, teacher, kappa):
        batch_size = student.shape[0]
        student_hat, student_mean, student_std = _standardise(student)
        teacher_hat, teacher_mean, teacher_std = _standardise(teacher)
        on_diagonal = (teacher_hat * student_hat).sum(dim=0) / batch_size
        gram_student, gram_teacher = student_hat @ student_hat.T, teacher_hat @ teacher_hat.T
        all_sq = (gram_teacher * gram_student).sum() / batch_size ** 2
        ctx.kappa = kappa
        ctx.save_for_backward(student, student_mean, student_std, teacher, teacher_mean, teacher_std,
                              gram_student, gram_teacher, on_diagonal)
        return (on_diagonal - 1).pow(2).sum() + kappa * (all_sq - on_diagonal.pow(2).sum())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (student, student_mean, student_std, teacher, teacher_mean, teacher_std,
         gram_student, gram_teacher, on_diagonal) = ctx.saved_tensors
        kappa, batch_size = ctx.kappa, student.shape[0]
        student_hat = _restandardise(student, student_mean, student_std)
        teacher_hat = _restandardise(teacher, teacher_mean, teacher_std)
        # dL/dZ^_s = dL/dC_ii * Z^_t / B  +  kappa * d(sum_ij C_ij^2)/dZ^_s, the latter = 2 G_t Z^_s / B^2.
        grad_on_diagonal = (2 * (on_diagonal - 1) - 2 * kappa * on_diagonal) * grad_loss / batch_size
        gram_scale = 2 * kappa * grad_loss / batch_size ** 2
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[1]:
            grad_hat = (student_hat * grad_on_diagonal).addmm_(gram_student * gram_scale, teacher_hat)
            grad_teacher = _standardise_backward(grad_hat, teacher_hat, teacher_std)
        if ctx.needs_input_grad[0]:
            # teacher_hat is not needed any more: its memory becomes the gradient.
            grad_hat = teacher_hat.mul_(grad_on_diagonal).addmm_(gram_teacher * gram_scale, student_hat)
            grad_student = _standardise_backward(grad_hat, student_hat, student_std)
        return grad_student, grad_teacher, None


def _standardise_backward(grad_hat, x_hat, std):
    """Gradient through x^ = (x - mean) / (std + eps), in place on grad_hat (batch norm's backward with eps):
    dx = (g - mean_b g) / (std + eps) - x^ * sum_b(g x^) / (B std)."""
    batch_size = x_hat.shape[0]
    through_std = (grad_hat * x_hat).sum(dim=0) / (batch_size * std)
    grad_hat -= grad_hat.mean(dim=0)
    grad_hat /= std + STANDARDISE_EPS
    return grad_hat.addcmul_(x_hat, through_std, value=-1)


def rsd_loss_gram(student_projected, teacher_embedding, kappa):
    """The same value from B x B Gram matrices, never forming C. O(B^2 D) time, O(B D + B^2) memory.

    sum_ij C_ij^2 = ||Z^_t^T Z^_s||_F^2 / B^2 = trace((Z^_t Z^_t^T)(Z^_s Z^_s^T)) / B^2, and both Gram
    matrices are symmetric, so the trace is the sum of their elementwise product.
    C_ii = sum_b Z^_t[b, i] Z^_s[b, i] / B is a column-wise dot product.
    """
    with _no_autocast(student_projected):
        return _GramRSD.apply(at_least_float32(student_projected), at_least_float32(teacher_embedding), kappa)


def rsd_loss(student_projected, teacher_embedding, kappa):
    """sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2 (a sum, not a mean), before the weight lambda.

    Inputs are [B, D] (feature maps flattened to [B, C*H*W]). The Gram form is used when D > B, where
    it is the cheaper of the two; both give the same value.
    """
    batch_size, dim = student_projected.shape
    if dim > batch_size:
        return rsd_loss_gram(student_projected, teacher_embedding, kappa)
    return rsd_loss_correlation(student_projected, teacher_embedding, kappa)


def _projector(in_dim, out_dim, gamma, spatial):
    """The decoupling projector: Linear(D_s, gamma*D_s) - BN - GELU - Linear(gamma*D_s, D_t), no biases.

    On stage feature maps the Linears become 1x1 convolutions, so every position shares the projector.
    """
    hidden = gamma * in_dim
    if hidden != int(hidden) or hidden < 1:
        raise ValueError(f"--rsd-gamma {gamma} gives a projector width of {hidden} for a student width of "
                         f"{in_dim}; choose a gamma whose product with {in_dim} is a whole number (e.g. 1/2, 1, 2)")
    hidden = int(hidden)
    if spatial:
        layers = [nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
                  nn.Conv2d(hidden, out_dim, 1, bias=False)]
    else:
        layers = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
                  nn.Linear(hidden, out_dim, bias=False)]
    projector = nn.Sequential(*layers)
    for module in projector.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
    return projector


def _channels(model, stage, input_size):
    """Width of the embedding (stage -1) or channels of a stage feature (C of a map, D of tokens)."""
    if stage == -1:
        return embedding_dim(model)
    shape = stage_info(model, stage, input_size)
    return shape[1] if feature_format(model) == 'tokens' else shape[0]


def _stage_key(stage):
    return 'embedding' if stage == -1 else f'stage{stage}'


def _as_map(model, feature):
    """A stage feature as a [B, C, H, W] map; token features lose their prefix (class) tokens."""
    if feature_format(model) == 'tokens':
        return tokens_to_map(feature, num_prefix_tokens(model))
    return feature


def _match_size(teacher_map, size):
    """The teacher map at the student's grid: average pooling when it is larger, bilinear when smaller.

    Pooling keeps every teacher position's contribution instead of sampling some of them; when the
    teacher grid is coarser there is nothing to pool, so it is interpolated.
    """
    height, width = teacher_map.shape[-2:]
    if (height, width) == tuple(size):
        return teacher_map
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(teacher_map, size)
    return F.interpolate(teacher_map, size=size, mode='bilinear', align_corners=False)


@register_distiller
class RSD(Distiller):
    """loss_gt + rsd_loss_weight * sum over the chosen stages of rsd_loss(projector(F_s), F_t, kappa)."""
    reads_shared_flags = ()
    teacher_reads = ('embedding',)

    @classmethod
    def cached_teacher_fields(cls, args):
        return cls.teacher_reads if list(args.rsd_stage) == [-1] else None  # stage maps: the teacher runs live

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        self.stages = list(args.rsd_stage)
        self.projectors = nn.ModuleDict()
        for stage in self.stages:
            self.projectors[_stage_key(stage)] = _projector(
                _channels(student, stage, args.input_size), _channels(teacher, stage, args.input_size),
                args.rsd_gamma, spatial=stage != -1)

    @classmethod
    def check_args(cls, args):
        stages = list(args.rsd_stage)
        if any(stage not in (-1, 1, 2, 3, 4) for stage in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"--rsd-stage takes distinct values among -1 (pooled embedding) and 1 2 3 4; "
                             f"got {stages}")
        if not args.rsd_gamma > 0:
            raise ValueError(f"--rsd-gamma must be positive, got {args.rsd_gamma}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--rsd-loss-weight', type=float, default=0.1,
                            help='lambda, the weight of the RSD loss (paper: 0.01 on ImageNet-1k)')
        parser.add_argument('--rsd-kappa', type=float, default=0.01,
                            help='weight of the off-diagonal correlations')
        parser.add_argument('--rsd-gamma', type=float, default=2,
                            help='hidden width of the projector in multiples of the student dim '
                                 '(paper: 4 on ImageNet-1k; 1/2 to 6 in its CIFAR-100 ablation, so 0.5 is accepted)')
        parser.add_argument('--rsd-stage', type=int, nargs='+', default=[-1],
                            help='features to match: -1 the pooled embedding, 1..4 stage maps (several allowed)')

    def forward(self, image, label, epoch=0):
        _, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        loss_rsd = 0.
        for stage in self.stages:
            projector = self.projectors[_stage_key(stage)]
            if stage == -1:
                projected, teacher_feature = projector(student_features[-1]), teacher_features[-1]
            else:
                student_map = _as_map(self.student, student_features[stage - 1])
                projected = projector(student_map)
                teacher_feature = _match_size(_as_map(self.teacher, teacher_features[stage - 1]),
                                              projected.shape[-2:])
            loss_rsd = loss_rsd + rsd_loss(projected.flatten(1), teacher_feature.flatten(1), self.args.rsd_kappa)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_rsd': self.args.rsd_loss_weight * loss_rsd}
