"""Binary KD, the logit baseline the OFA and RSD code bases ship beside KD.

Each class is treated as an independent binary problem whose target is the teacher's softmax
probability of that class.
"""
import torch.nn.functional as F

from ._base import Distiller, at_least_float32
from .registry import register_distiller


def bkd_loss(logits_student, logits_teacher):
    """Binary cross-entropy with logits of z_s against p_t = softmax(z_t), averaged over batch and classes:

        -mean_{b,c} [p_t,bc * log sigmoid(z_s,bc) + (1 - p_t,bc) * log(1 - sigmoid(z_s,bc))]

    The teacher's probabilities are targets (no gradient reaches the teacher side). No temperature, as in
    the reference.
    """
    return F.binary_cross_entropy_with_logits(at_least_float32(logits_student),
                                              at_least_float32(logits_teacher.detach()).softmax(dim=-1))


@register_distiller
class BKD(Distiller):
    """loss_gt + kd_loss_weight * bkd_loss(z_s, z_t)."""

    def forward(self, image, label, epoch=0):
        logits_teacher = self.teacher_logits(image)
        logits_student = self.student(image)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': self.args.kd_loss_weight * bkd_loss(logits_student, logits_teacher)}
