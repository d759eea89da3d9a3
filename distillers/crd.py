"""Tian et al., ICLR 2020: Contrastive Representation Distillation (CRD), as the OFA and RSD code bases
compute it.

Each side's pooled embedding is projected to `--crd-feat-dim` and L2-normalised. A memory bank per side
holds one such vector per training sample (a momentum average over the epochs). For every sample, the
student's vector is scored against the teacher bank's entry of the same sample (the positive) and of K
samples of other classes (the negatives), and the reverse for the teacher's vector; an NCE loss with noise
probability 1/N tells the positive from the negatives.

Differences from the reference, none changing the loss: the negatives are drawn on the device, from an
index array sorted by class, instead of per-sample lists in the data loader; under DDP every process adds
all processes' samples to its banks (the reference's banks were each rank's own, then replaced by rank 0's);
the normalising constants are averaged over the processes' first batches.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from custom_forward import embedding_dim, forward_features
from xkd.distributed import all_gather_batches, all_reduce_mean

from ._base import Distiller
from .registry import register_distiller

NCE_EPS = 1e-7


def crd_nce_loss(scores, num_data):
    """The NCE loss of CRD on scores P [B, K + 1], column 0 the positive, with noise probability 1/N:

        -(sum_i log(P_i0 / (P_i0 + K/N + eps)) + sum_{i, j >= 1} log((K/N) / (P_ij + K/N + eps))) / B

    eps = 1e-7, N = `num_data`. P are exp(similarity / T) / Z, normalised scores, not probabilities.
    Summed over the K + 1 columns and averaged over the batch, as in the reference.
    """
    batch_size, num_negatives = scores.shape[0], scores.shape[1] - 1
    noise = num_negatives / num_data
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_positive = torch.log(positive / (positive + noise + NCE_EPS))
    log_negatives = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_positive.sum() + log_negatives.sum()) / batch_size


class Embed(nn.Module):
    """Linear to the contrast width, then L2 normalisation (PyTorch's default Linear init, as the reference)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, embedding):
        return F.normalize(self.linear(embedding.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks (N x feat_dim each), the normalising constants Z and the class index for sampling
    negatives. All are buffers: the banks and Z are saved in checkpoints; the class index is rebuilt from the
    training labels by `bind` and not saved.
    """

    def __init__(self, feat_dim):
        super().__init__()
        self.feat_dim = feat_dim
        self.register_buffer('bank_student', torch.zeros(0, feat_dim))
        self.register_buffer('bank_teacher', torch.zeros(0, feat_dim))
        # Z of the student's and the teacher's scores; negative until the first batch sets them.
        self.register_buffer('z_student', torch.tensor(-1.))
        self.register_buffer('z_teacher', torch.tensor(-1.))
        self.register_buffer('sample_class', torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer('by_class', torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer('class_start', torch.zeros(0, dtype=torch.long), persistent=False)
        self.z_known = False  # whether Z is set; read from the buffers once, so steps need no host sync

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.z_known = False

    def bind(self, targets, seed):
        """Size the banks for len(targets) samples and index the samples by class.

        The banks start uniform in [-1/sqrt(d/3), 1/sqrt(d/3)] as in the reference, drawn from a generator
        seeded with `seed` so that every process starts from the same banks.
        """
        targets = torch.as_tensor(targets, dtype=torch.long)
        num_data, bound = len(targets), 1.0 / math.sqrt(self.feat_dim / 3)
        generator = torch.Generator().manual_seed(seed)
        for name in ('bank_student', 'bank_teacher'):
            bank = torch.rand(num_data, self.feat_dim, generator=generator).mul_(2 * bound).sub_(bound)
            setattr(self, name, bank.to(getattr(self, name).device))
        device = self.bank_student.device
        counts = torch.bincount(targets)
        self.sample_class = targets.to(device)
        self.by_class = torch.argsort(targets, stable=True).to(device)
        self.class_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)

    @property
    def num_data(self):
        return self.bank_student.shape[0]

    def sample_negatives(self, indices, k):
        """[B, K] indices of training samples drawn uniformly, with replacement, from the classes other than
        each sample's own (the reference's np.random.choice over its per-class negative lists), on the device.

        The samples of class c occupy by_class[start_c : start_c + n_c]; a draw r in [0, N - n_c) skips that
        range: position r if r < start_c, else r + n_c.
        """
        classes = self.sample_class[indices]
        start = self.class_start[classes][:, None]
        count = self.class_start[classes + 1][:, None] - start
        # Integers modulo N - n_c: the bias of the modulo is below N / 2^62, unlike float draws' rounding.
        draws = torch.randint(0, 2 ** 62, (len(indices), k), device=indices.device)
        position = draws % (self.num_data - count)
        position = position + (position >= start) * count
        return self.by_class[position]

    @torch.no_grad()
    def set_z(self, scores_student, scores_teacher):
        """Z = mean score * N from the first batch (over all processes), then fixed, as in the reference."""
        if self.z_student < 0:
            self.z_student.copy_(all_reduce_mean(scores_student.mean()) * self.num_data)
            self.z_teacher.copy_(all_reduce_mean(scores_teacher.mean()) * self.num_data)
        self.z_known = True

    @torch.no_grad()
    def update(self, indices, student, teacher, momentum):
        """bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * v_i) for the samples of every process."""
        indices = all_gather_batches(indices)
        for bank, vectors in ((self.bank_student, student), (self.bank_teacher, teacher)):
            vectors = all_gather_batches(vectors.detach().to(bank.dtype))
            mixed = bank.index_select(0, indices).mul_(momentum).add_(vectors, alpha=1 - momentum)
            bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


@register_distiller
class CRD(Distiller):
    """loss_gt + kd_loss_weight * (crd_nce_loss(P_s, N) + crd_nce_loss(P_t, N))."""
    teacher_reads = ('embedding',)

    needs_indices = True

    def __init__(self, student, teacher, criterion, args):
        super().__init__(student, teacher, criterion, args)
        self.check_args(args)
        self.embed_student = Embed(embedding_dim(student), args.crd_feat_dim)
        self.embed_teacher = Embed(embedding_dim(teacher), args.crd_feat_dim)
        self.memory = ContrastMemory(args.crd_feat_dim)

    @classmethod
    def check_args(cls, args):
        if args.crd_feat_dim < 1 or args.crd_k < 1:
            raise ValueError(f"--crd-feat-dim and --crd-k must be positive integers, got {args.crd_feat_dim} "
                             f"and {args.crd_k}")
        if not 0 <= args.crd_momentum < 1:
            raise ValueError(f"--crd-momentum must be in [0, 1), got {args.crd_momentum}")
        if args.crd_temperature <= 0:
            raise ValueError(f"--crd-temperature must be positive, got {args.crd_temperature}")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument('--crd-feat-dim', type=int, default=128, help='width of the contrast embeddings')
        parser.add_argument('--crd-k', type=int, default=16384, help='negatives per sample')
        parser.add_argument('--crd-momentum', type=float, default=0.5, help='momentum of the memory banks')
        parser.add_argument('--crd-temperature', type=float, default=0.07, help='temperature of the scores')

    def bind_train_data(self, targets):
        targets = torch.as_tensor(targets, dtype=torch.long)
        if len(targets) == 0 or targets.min() < 0:
            raise ValueError('crd needs the training labels as class indices >= 0, one per sample')
        if torch.unique(targets).numel() < 2:
            raise ValueError('crd draws its negatives from the other classes; the training set has only one class')
        self.memory.bind(targets, getattr(self.args, 'seed', 0))
        # Every process applies the same all-gathered updates, so the banks agree without DDP broadcasting
        # them at each forward (2 x 50,000 x 128 floats on CIFAR-100, 1.3 GB on ImageNet-1k).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f'memory.{name}' for name, _ in self.memory.named_buffers()])

    def contrast_scores(self, vectors, bank, index):
        """exp(<bank[index], v> / T) [B, K + 1]: each sample's vector against its positive and negatives."""
        rows = bank[index]  # [B, K + 1, D], a copy: the in-place bank update after this does not reach it
        return torch.exp(torch.einsum('bkd,bd->bk', rows, vectors) / self.args.crd_temperature)

    def forward(self, image, label, epoch=0, indices=None):
        if indices is None or self.memory.num_data == 0:
            raise RuntimeError('crd needs bind_train_data(training labels) before training and the samples\' '
                               'dataset indices in forward(..., indices=...)')
        _, teacher_features = self.teacher_features(image)
        logits_student, student_features = forward_features(self.student, image)
        memory, num_data = self.memory, self.memory.num_data
        # Scores are exponentials of similarities / 0.07 (up to e^14): float32, outside autocast.
        with torch.autocast(image.device.type, enabled=False):
            student = self.embed_student(student_features[-1].float())
            teacher = self.embed_teacher(teacher_features[-1].float())
            index = torch.cat([indices[:, None], memory.sample_negatives(indices, self.args.crd_k)], dim=1)
            scores_student = self.contrast_scores(student, memory.bank_teacher, index)
            scores_teacher = self.contrast_scores(teacher, memory.bank_student, index)
            if not memory.z_known:
                memory.set_z(scores_student, scores_teacher)
            loss = (crd_nce_loss(scores_student / memory.z_student, num_data)
                    + crd_nce_loss(scores_teacher / memory.z_teacher, num_data))
            memory.update(indices, student, teacher, self.args.crd_momentum)
        return logits_student, {'loss_gt': self.gt_loss(logits_student, label),
                                'loss_kd': self.args.kd_loss_weight * loss}
