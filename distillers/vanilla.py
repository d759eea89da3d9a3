from ._base import Distiller
from .registry import register_distiller


@register_distiller
class Vanilla(Distiller):
    """The student trained alone on the ground truth: the baseline every table starts from."""
    reads_shared_flags = ()

    requires_teacher = False

    def forward(self, image, label, epoch=0):
        logits = self.student(image)
        return logits, {'loss_gt': self.gt_loss(logits, label)}
