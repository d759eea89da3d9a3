"""Huang et al., NeurIPS 2022: Knowledge Distillation from A Stronger Teacher (DIST); docs/methods/dist.md.

Instead of matching probabilities exactly (KL), DIST matches their relations: the Pearson correlation
of student and teacher predictions per sample (inter-class) and per class over the batch (intra-class).
"""
from ._base import Distiller
from .registry import register_distiller

PEARSON_EPS = 1e-8


def _pearson(a, b, eps=PEARSON_EPS):
    """Pearson correlation of a[i, :] and b[i, :] for each row i.

    eps keeps constant rows finite (their correlation is 0), as in the reference."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(logits_student, logits_teacher, beta, gamma, tau):
    """tau^2 * (beta * inter + gamma * intra), p = softmax(z / tau).

    inter = 1 - mean over samples of Pearson(p_s[b, :], p_t[b, :]);
    intra = 1 - mean over classes of Pearson(p_s[:, c], p_t[:, c]).
    """
    p_student = (logits_student / tau).softmax(dim=-1)
    p_teacher = (logits_teacher / tau).softmax(dim=-1)
    inter = 1 - _pearson(p_student, p_teacher).mean()
    intra = 1 - _pearson(p_student.T, p_teacher.T).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


@register_distiller
class DIST(Distiller):
    """loss_gt + kd_loss_weight * dist_loss(z_s, z_t), the weight applied as in the OFA-KD / RSD code."""

    @classmethod
    def check_args(cls, args):
        if args.dist_tau <= 0:
            raise ValueError(f"--dist-tau must be positive, got {args.dist_tau}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--dist-beta', type=float, default=1.0, help='weight of the inter-class relation')
        parser.add_argument('--dist-gamma', type=float, default=1.0, help='weight of the intra-class relation')
        parser.add_argument('--dist-tau', type=float, default=1.0, help='DIST temperature')

    def forward(self, image, label, epoch=0):
        logits_teacher = self.teacher_logits(image)
        logits_student = self.student(image)
        loss_kd = self.args.kd_loss_weight * dist_loss(logits_student, logits_teacher, self.args.dist_beta,
                                                       self.args.dist_gamma, self.args.dist_tau)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label), 'loss_kd': loss_kd}
