"""Checkpoints written under timm 0.6.5 (the OFA-KD and RSD code bases' version) load into today's timm
through our reader and give the logits they gave there.

tests/old_timm/make_checkpoints.py wrote the files, with timm 0.6.5, from the tiny architectures listed in
tests/old_timm/tiny_models.py; manifest.json holds the logits each gave on input.pt.
"""
import argparse
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch

from xkd import models
from xkd.errors import UserError

OLD_TIMM = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'old_timm')
sys.path.insert(0, OLD_TIMM)
from tiny_models import IMG_SIZE, MODELS, NUM_CLASSES, architecture_overrides  # noqa: E402

with open(os.path.join(OLD_TIMM, 'manifest.json')) as manifest_file:
    MANIFEST = {entry['family']: entry for entry in json.load(manifest_file)['models']}
FAMILIES = [family for family, *_ in MODELS]


def create_tiny(family, num_classes=NUM_CLASSES, **kwargs):
    _, name, creator, arch_kwargs, model_kwargs = MODELS[FAMILIES.index(family)]
    with architecture_overrides(name, creator, arch_kwargs):
        return models.create_model(name, num_classes, (3, IMG_SIZE, IMG_SIZE), **model_kwargs, **kwargs)


def old_file(family):
    return os.path.join(OLD_TIMM, MANIFEST[family]['file'])


@pytest.mark.parametrize('family', FAMILIES)
def test_old_timm_checkpoint_gives_the_same_logits(family):
    model = create_tiny(family).eval()
    path = old_file(family)
    models.load_weights(model, models.read_state_dict(path), MANIFEST[family]['model'], path, NUM_CLASSES,
                        '--teacher-pretrained')
    with torch.no_grad():
        logits = model(torch.load(os.path.join(OLD_TIMM, 'input.pt'), weights_only=True))
    expected = torch.tensor(MANIFEST[family]['logits'])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-5


def test_old_timm_swin_conversion_is_logged_in_one_line(caplog):
    model = create_tiny('Swin')
    with caplog.at_level(logging.INFO, logger='xkd.models'):
        models.load_weights(model, models.read_state_dict(old_file('Swin')), 'swin', old_file('Swin'), NUM_CLASSES,
                            '--teacher-pretrained')
    lines = [record.getMessage() for record in caplog.records if 'older timm layout' in record.getMessage()]
    assert len(lines) == 1
    # Renamed: 3 patch mergings x 3 tensors (norm weight and bias, reduction) move one stage on, and the
    # classifier's weight and bias go from `head` to `head.fc`. Dropped: the relative_position_index of each of
    # the 6 blocks and the attn_mask of the one shifted block (later stages fit in a single window).
    assert ('swin_transformer.checkpoint_filter_fn: 11 keys renamed, 7 dropped (attn_mask, relative_position_index)'
            in lines[0]), lines[0]


def teacher_args(family, path, num_classes=NUM_CLASSES):
    return argparse.Namespace(teacher=MANIFEST[family]['model'], num_classes=num_classes,
                              input_size=(3, IMG_SIZE, IMG_SIZE), teacher_kwargs={}, teacher_pretrained=path,
                              use_ema_teacher=False)


@pytest.mark.parametrize('family', ['ConvNeXt', 'DeiT distilled', 'Swin'])
def test_old_timm_teacher_through_create_teacher(family):
    """--teacher-pretrained: the reference saver's file (ConvNeXt), two heads (DeiT), the old layout (Swin)."""
    _, name, creator, arch_kwargs, _ = MODELS[FAMILIES.index(family)]
    with architecture_overrides(name, creator, arch_kwargs):
        teacher = models.create_teacher(teacher_args(family, old_file(family)))
    with torch.no_grad():
        logits = teacher(torch.load(os.path.join(OLD_TIMM, 'input.pt'), weights_only=True))
    assert not teacher.training
    assert (logits - torch.tensor(MANIFEST[family]['logits'])).abs().max() <= 1e-5


def test_reference_saver_file_keeps_its_namespace_of_arguments():
    checkpoint = models.read_checkpoint(old_file('ConvNeXt'))
    assert isinstance(checkpoint['args'], argparse.Namespace) and checkpoint['args'].model == 'convnext_tiny'
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'metric'} <= set(checkpoint)


def test_a_file_with_another_python_class_is_refused_by_name(tmp_path):
    path = tmp_path / 'numpy_metric.pth.tar'
    state_dict = models.read_state_dict(old_file('ViT'))
    torch.save({'state_dict': state_dict, 'metric': np.float64(81.5)}, path)
    with pytest.raises(UserError) as error:
        models.read_state_dict(str(path))
    message = str(error.value)
    assert 'multiarray.scalar' in message and 'numpy_metric.pth.tar' in message
    assert 'is the file complete' not in message


def test_distilled_deit_teacher_with_another_class_count_is_a_user_error():
    _, name, creator, arch_kwargs, _ = MODELS[FAMILIES.index('DeiT distilled')]
    with architecture_overrides(name, creator, arch_kwargs), pytest.raises(UserError) as error:
        models.create_teacher(teacher_args('DeiT distilled', old_file('DeiT distilled'), num_classes=5))
    assert 'its classifier has 10 classes but --num-classes is 5' in str(error.value)


@pytest.mark.parametrize('family', ['Swin', 'DeiT distilled'])
def test_pretrained_path_of_an_old_file_keeps_the_body_and_drops_the_heads(family, caplog):
    """--pretrained-path with another class count: converted body loaded, every head (DeiT: two) left new."""
    path = old_file(family)
    with caplog.at_level(logging.INFO, logger='xkd.models'):
        model = create_tiny(family, pretrained_path=path)  # 10 classes: loaded as they are
        fine_tuned = create_tiny(family, num_classes=5, pretrained_path=path)
    loaded, tuned = model.state_dict(), fine_tuned.state_dict()
    heads = models.classifier_keys(fine_tuned)
    assert len(heads) == (4 if family == 'DeiT distilled' else 2)
    assert all(tuned[key].shape[0] == 5 for key in heads)
    assert all(torch.equal(loaded[key], tuned[key]) for key in loaded if key not in heads)
    log = caplog.text
    assert 'its 10-class classifier was dropped; a new 5-class head starts from random weights' in log
    assert (log.count('older timm layout') == 2) == (family == 'Swin')
