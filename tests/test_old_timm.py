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

import pytest
import torch

from xkd import models

OLD_TIMM = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'old_timm')
sys.path.insert(0, OLD_TIMM)
from tiny_models import IMG_SIZE, MODELS, NUM_CLASSES, architecture_overrides  # noqa: E402

with open(os.path.join(OLD_TIMM, 'manifest.json')) as manifest_file:
    MANIFEST = {entry['family']: entry for entry in json.load(manifest_file)['models']}
FAMILIES = [family for family, *_ in MODELS]


def create_tiny(family, **kwargs):
    _, name, creator, arch_kwargs, model_kwargs = MODELS[FAMILIES.index(family)]
    with architecture_overrides(name, creator, arch_kwargs):
        return models.create_model(name, NUM_CLASSES, (3, IMG_SIZE, IMG_SIZE), **model_kwargs, **kwargs)


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
