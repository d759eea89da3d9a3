"""The distiller contract (docs/README.md, "What every method shares").

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
    # Set by subclasses whose forward takes `indices`, each sample's position in the training set (CRD's
    # memory banks); the training loop passes them only then, so other methods keep the plain signature.
    needs_indices = False
    # The flags shared between methods (--kd-temperature, --kd-loss-weight) that this method reads; train.py
    # warns when one it does not read is given on the command line.
    reads_shared_flags = ('kd_loss_weight',)
    # What the method reads of the teacher, which is what --teacher-cache stores for it: 'logits' and/or
    # 'embedding' (the pooled pre-logits features). None: it needs the stage maps, and runs the teacher live.
    teacher_reads = ('logits',)
    # Set by train.py with --teacher-cache: serves the teacher's outputs of each batch (xkd/teacher_cache.py).
    teacher_cache = None

    @classmethod
    def cached_teacher_fields(cls, args):
        """The teacher outputs this run reads (see `teacher_reads`); None when a cache cannot serve it."""
        return cls.teacher_reads

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

    def bind_train_data(self, targets):
        """Called by train.py with the training set's class labels (one per sample, in dataset order) before
        the distiller is moved to the device. Methods that sample from the training set (CRD) size their
        state here; the others ignore it."""

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def gt_loss(self, student_logits, label):
        return self.args.gt_loss_weight * self.criterion(student_logits, label)

    # Distillers call the teacher before the student: its activations are freed before the student's,
    # which autograd keeps until backward, are allocated; on CPU that measured 7 % faster per step.
    def teacher_logits(self, image):
        """The teacher's logits, float32, usable by the losses (see `teacher_features`)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.serve(image, lambda: self._live_cached_fields(image))['logits']
        with self._teacher_mode():
            logits = self.teacher(self._teacher_input(image))
        return autograd_copy(logits)

    def teacher_features(self, image):
        """Teacher logits and its five features (stages 1..4, embedding) from one pass, as float32.

        The teacher runs under inference mode (cheaper than no_grad: no version counters, no view tracking)
        in its own dtype (`--teacher-dtype`) and, under `--amp`, in the autocast dtype. From a teacher cache,
        the stage features are None (only methods that read no stage map are served by one).
        """
        if self.teacher_cache is not None:
            served = self.teacher_cache.serve(image, lambda: self._live_cached_fields(image))
            return served.get('logits'), [None, None, None, None, served['embedding']]
        from custom_forward import forward_features
        with self._teacher_mode():
            logits, feats = forward_features(self.teacher, self._teacher_input(image))
        return autograd_copy(logits), [autograd_copy(f) for f in feats]

    def _live_cached_fields(self, image):
        """The cached fields computed by the teacher, as the uncached calls compute them (the logits of
        `forward_features` are bit-identical to the model's own forward; tests/test_teacher_cache.py)."""
        fields = self.teacher_cache.fields
        if 'embedding' not in fields:
            with self._teacher_mode():
                return {'logits': autograd_copy(self.teacher(self._teacher_input(image)))}
        from custom_forward import forward_features
        with self._teacher_mode():
            logits, feats = forward_features(self.teacher, self._teacher_input(image))
        return {'logits': autograd_copy(logits), 'embedding': autograd_copy(feats[-1])}

    def _teacher_mode(self):
        # torch.compile cannot trace inference mode; no_grad is the next best there.
        return torch.no_grad() if getattr(self.args, 'torchcompile', False) else torch.inference_mode()

    def _teacher_input(self, image):
        dtype = self.teacher_dtype
        return image if image.dtype == dtype or torch.is_autocast_enabled(image.device.type) else image.to(dtype)

    @property
    def teacher_dtype(self):
        return next(self.teacher.parameters()).dtype

    def extra_modules(self):
        """Named child modules other than the student: the distiller's own trainable parts."""
        return {name: module for name, module in self.named_children() if name not in ('student', 'criterion')}

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


def autograd_copy(tensor):
    """A float32 tensor made outside inference mode, which the losses' autograd graph may save.

    Inference-mode tensors cannot be saved for backward; the copy (or the cast from a lower teacher dtype)
    is what makes them usable, and it costs one pass over the teacher's outputs.
    """
    return tensor.clone() if tensor.is_inference() and tensor.dtype == torch.float32 else tensor.float()


def at_least_float32(tensor):
    """`tensor` in float32, or in its own dtype when that is wider (float64 in the tests' reference values)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def hard_target(label):
    """Class indices from hard or soft (mixup/cutmix) labels: methods that need the target class use the argmax."""
    return label.argmax(dim=-1) if label.dim() > 1 else label
