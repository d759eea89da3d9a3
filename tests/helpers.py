"""Building distillers directly, without train.py, for the method tests."""
import argparse

import timm
import torch

from distillers import get_distiller


def distiller_args(name, num_classes=10, input_size=32, **overrides):
    """The method's flag defaults plus what train.py sets before building a distiller."""
    parser = argparse.ArgumentParser()
    get_distiller(name).add_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(dict(gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=1.0, num_classes=num_classes,
                           input_size=(3, input_size, input_size)), **overrides)
    return args


def build_distiller(name, student, teacher, criterion=None, **overrides):
    torch.manual_seed(0)
    return get_distiller(name)(student, teacher, criterion or torch.nn.CrossEntropyLoss(),
                               distiller_args(name, **overrides))


def create(name, **kwargs):
    """A timm model with seeded random weights."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)
