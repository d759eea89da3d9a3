"""Hinton et al., 2015: "Distilling the Knowledge in a Neural Network"."""
import torch.nn.functional as F

from ._base import Distiller
from .registry import register_distiller


def kd_loss(logits_student, logits_teacher, temperature=1.0):
    """T^2 * KL(p_t || p_s) with p = softmax(z / T), averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T, as in the paper.
    """
    log_p_student = F.log_softmax(logits_student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(logits_teacher / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * temperature ** 2


@register_distiller
class KD(Distiller):
    reads_shared_flags = ('kd_loss_weight', 'kd_temperature')

    def forward(self, image, label, epoch=0):
        logits_teacher = self.teacher_logits(image)
        logits_student = self.student(image)
        loss_kd = self.args.kd_loss_weight * kd_loss(logits_student, logits_teacher, self.args.kd_temperature)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label), 'loss_kd': loss_kd}
