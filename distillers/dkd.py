"""Zhao et al., CVPR 2022: Decoupled Knowledge Distillation (DKD); docs/methods/dkd.md.

KD's KL splits into a target-class term (TCKD: the binary target / non-target split) and a
non-target term (NCKD: the distribution over the other classes), weighted separately by alpha and beta.
"""
import torch
import torch.nn.functional as F

from ._base import Distiller, hard_target
from .registry import register_distiller


def _non_target_index(target, num_classes):
    """[B, K - 1] indices of the non-target classes, in order (a gather, so no host sync as with a boolean mask)."""
    index = torch.arange(num_classes - 1, device=target.device).expand(target.shape[0], -1)
    return index + (index >= target[:, None]).long()


def _binary_and_non_target_log_probs(logits, target):
    """log b = (log p_y, log(1 - p_y)) [B, 2] and log p^ over the K - 1 non-target classes [B, K - 1].

    Everything stays in log space: log(1 - p_y) = logsumexp over non-target logits - logsumexp over all,
    and the target column is removed rather than masked, so no log(0) appears (mdistiller takes the log
    of probabilities, which gives -inf and NaN once a probability underflows).
    """
    non_target_logits = logits.gather(-1, _non_target_index(target, logits.shape[-1]))
    log_all = torch.logsumexp(logits, dim=-1)
    log_non_target = torch.logsumexp(non_target_logits, dim=-1)
    log_p_target = logits.gather(-1, target[:, None]).squeeze(-1) - log_all
    log_binary = torch.stack([log_p_target, log_non_target - log_all], dim=-1)
    return log_binary, F.log_softmax(non_target_logits, dim=-1)


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """alpha * TCKD + beta * NCKD with TCKD = T^2 KL(b_t || b_s), NCKD = T^2 KL(p^_t || p^_s), batch-averaged.

    `target` holds class indices [B]. The warm-up factor is applied by the distiller, not here.
    """
    log_binary_student, log_non_target_student = _binary_and_non_target_log_probs(logits_student / temperature, target)
    log_binary_teacher, log_non_target_teacher = _binary_and_non_target_log_probs(logits_teacher / temperature, target)
    tckd = F.kl_div(log_binary_student, log_binary_teacher, reduction='batchmean', log_target=True)
    nckd = F.kl_div(log_non_target_student, log_non_target_teacher, reduction='batchmean', log_target=True)
    return (alpha * tckd + beta * nckd) * temperature ** 2


@register_distiller
class DKD(Distiller):
    """loss_gt + kd_loss_weight * ramp * dkd_loss, alpha and beta weighting its two terms.

    kd_loss_weight multiplies the term as in the OFA-KD / RSD code (their tables' DKD numbers). ramp is 1, or
    with `--dkd-warmup N` mdistiller's linear warm-up min((epoch + 1) / N, 1) (it counts epochs from 1).
    """

    @classmethod
    def check_args(cls, args):
        if args.dkd_temperature <= 0:
            raise ValueError(f"--dkd-temperature must be positive, got {args.dkd_temperature}")
        if args.dkd_warmup < 0:
            raise ValueError(f"--dkd-warmup must not be negative (0 turns the warm-up off), got {args.dkd_warmup}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--dkd-alpha', type=float, default=1.0, help='weight of TCKD')
        parser.add_argument('--dkd-beta', type=float, default=2.0, help='weight of NCKD')
        parser.add_argument('--dkd-temperature', type=float, default=1.0, help='DKD temperature')
        parser.add_argument('--dkd-warmup', type=int, default=0,
                            help="epochs over which the DKD loss ramps up linearly (mdistiller's CIFAR recipe: 20); "
                                 "0: none, as in the OFA-KD / RSD code")

    def forward(self, image, label, epoch=0):
        logits_teacher = self.teacher_logits(image)
        logits_student = self.student(image)
        warmup = self.args.dkd_warmup
        # mdistiller counts epochs from 1, so the first epoch already trains with 1/warmup of the loss.
        ramp = min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0
        loss_kd = self.args.kd_loss_weight * ramp * dkd_loss(logits_student, logits_teacher, hard_target(label),
                                  self.args.dkd_alpha, self.args.dkd_beta, self.args.dkd_temperature)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label), 'loss_kd': loss_kd}
