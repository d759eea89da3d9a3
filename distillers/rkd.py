"""Park et al., CVPR 2019: Relational Knowledge Distillation (RKD), as the OFA and RSD code bases compute it.

The student matches the teacher's relations between the samples of a batch, not the features themselves:
pairwise distances (normalised by their mean) and the angles formed by every triplet. Relations need no
common width, so the pooled embeddings of any two architectures are compared without a projector.
"""
import torch
import torch.nn.functional as F

from custom_forward import forward_features

from ._base import Distiller, at_least_float32
from .correlation import check_batch_size
from .registry import register_distiller


def pairwise_distances(features, squared, eps):
    """[B, B] Euclidean distances (squared ones with `squared`), clamped at `eps` before the root, zero diagonal."""
    square_norms = features.pow(2).sum(dim=1)
    distances = (square_norms[:, None] + square_norms[None, :] - 2 * features @ features.T).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    return distances * (1 - torch.eye(len(features), dtype=features.dtype, device=features.device))


def _normalised_distances(features, squared, eps):
    distances = pairwise_distances(features, squared, eps)
    return distances / distances[distances > 0].mean()


def _triplet_cosines(features):
    """cos of the angle at sample i between samples j and k, for every (i, j, k) in that order: [B * B * B];
    0 where j or k coincides with i."""
    differences = F.normalize(features[None, :, :] - features[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


def rkd_loss(feature_student, feature_teacher, distance_weight, angle_weight, squared=False, eps=1e-12):
    """distance_weight * smoothL1(D_s / mean(D_s > 0), D_t / mean(D_t > 0)) + angle_weight * smoothL1(A_s, A_t).

    D are the pairwise distances of the flattened features (`pairwise_distances`), each matrix divided by
    the mean of its positive entries; A the cosines of all B^3 triplet angles. Smooth L1 (beta 1) is averaged
    over the entries. The teacher side is computed without gradient. Computed in float32 or wider, outside
    autocast (the distances are differences of large products). Needs B >= 2.
    """
    with torch.autocast(feature_student.device.type, enabled=False):
        student = at_least_float32(feature_student.flatten(1))
        with torch.no_grad():
            teacher = feature_teacher.flatten(1).to(student.dtype)
            teacher_distances = _normalised_distances(teacher, squared, eps)
            teacher_angles = _triplet_cosines(teacher)
        loss_distance = F.smooth_l1_loss(_normalised_distances(student, squared, eps), teacher_distances)
        loss_angle = F.smooth_l1_loss(_triplet_cosines(student), teacher_angles)
    return distance_weight * loss_distance + angle_weight * loss_angle


@register_distiller
class RKD(Distiller):
    """loss_gt + kd_loss_weight * rkd_loss(e_s, e_t) on the pooled embeddings."""
    teacher_reads = ('embedding',)

    @classmethod
    def check_args(cls, args):
        if args.rkd_eps <= 0:
            raise ValueError(f"--rkd-eps must be positive (it keeps the square root's gradient finite), "
                             f"got {args.rkd_eps}")
        check_batch_size(args, 'rkd')

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--rkd-distance-weight', type=float, default=25., help='weight of the distance term')
        parser.add_argument('--rkd-angle-weight', type=float, default=50., help='weight of the angle term')
        parser.add_argument('--rkd-eps', type=float, default=1e-12,
                            help='lower clamp of the squared pairwise distances')
        parser.add_argument('--rkd-squared', action='store_true', help='use squared distances')

    def forward(self, image, label, epoch=0):
        _, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        args = self.args
        loss = rkd_loss(student_features[-1], teacher_features[-1], args.rkd_distance_weight, args.rkd_angle_weight,
                        args.rkd_squared, args.rkd_eps)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': args.kd_loss_weight * loss}
