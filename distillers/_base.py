"""The distiller contract (SPEC.md 2.2).

A distiller is an `nn.Module` that owns the student and its extra modules (projectors, branches).
The frozen teacher is held outside the module tree on purpose: it is not part of `state_dict()`,
not moved by `.to()` on the distiller, not seen by DDP and never put back into train mode.
"""
import torch
import torch.nn as nn


class Distiller(nn.Module):
    """Base class. Subclasses implement `forward(image, label, epoch) -> (student_logits, losses)`.

    `losses` holds already weighted scalar tensors; the total loss is their sum.
    """

    # Set by subclasses that need the teacher at all; `vanilla` does not.
    requires_teacher = True

    def __init__(self, student, teacher, criterion, args):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.args = args
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        object.__setattr__(self, 'teacher', teacher)

    @staticmethod
    def add_arguments(parser):
        """Add this method's flags to `parser` (an argparse group). Names must be unique across methods."""

    @classmethod
    def check_args(cls, args):
        """Raise ValueError for flag values this method cannot use; called before any model is built."""

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def gt_loss(self, student_logits, label):
        return self.args.gt_loss_weight * self.criterion(student_logits, label)

    @torch.no_grad()
    def teacher_logits(self, image):
        return self.teacher(image).float()

    @torch.no_grad()
    def teacher_features(self, image):
        """Teacher logits and its five features (stages 1..4, embedding) from one pass, as float32."""
        from custom_forward import forward_features
        logits, feats = forward_features(self.teacher, image)
        return logits.float(), [f.float() for f in feats]

    def extra_modules(self):
        """Named child modules other than the student: the distiller's own trainable parts."""
        return {name: module for name, module in self.named_children() if name != 'student'}

    def extra_parameters(self):
        return [p for name, module in self.extra_modules().items() for p in module.parameters()]

    def extra_state_dict(self):
        return {name: module.state_dict() for name, module in self.extra_modules().items()}

    def load_extra_state_dict(self, state):
        modules = self.extra_modules()
        if set(state) != set(modules):
            raise KeyError(f"checkpoint has extra modules {sorted(state)}, this distiller has {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(state[name])


def hard_target(label):
    """Class indices from hard or soft (mixup/cutmix) labels: methods that need the target class use the argmax."""
    return label.argmax(dim=-1) if label.dim() > 1 else label
