"""Write tiny checkpoints under timm 0.6.5, the version the OFA-KD and RSD code bases (and their released
teachers) use, with the logits each gave there. tests/test_old_timm.py loads them with today's timm through
our checkpoint reader and asks for the same logits.

Run once, with timm 0.6.5 in a folder of its own so that the installed timm stays as it is:

    pip install --target /tmp/timm065 timm==0.6.5 --no-deps
    PYTHONPATH=/tmp/timm065 python tests/old_timm/make_checkpoints.py

Each model is the family's timm entrypoint at a tiny size (few blocks, narrow, 32 px input), randomly
initialised from a fixed seed (tiny_models.py lists them; the test builds them from the same list).
The ConvNeXt file is written by timm 0.6.5's own CheckpointSaver, as the reference train.py writes teachers
and students: state under `state_dict`, with `optimizer`, `epoch`, `arch`, `version`, `metric` and `args` (an
argparse.Namespace).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import timm
import torch
from timm.utils import CheckpointSaver

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_models import IMG_SIZE, MODELS, NUM_CLASSES, architecture_overrides  # noqa: E402

SEED = 0
REFERENCE_SAVER_FAMILY = 'ConvNeXt'


def create_old_model(name, creator, arch_kwargs, model_kwargs):
    with architecture_overrides(name, creator, arch_kwargs):
        try:
            return timm.create_model(name, num_classes=NUM_CLASSES, img_size=IMG_SIZE, **model_kwargs)
        except TypeError as e:  # convolutional models run at any size and take no img_size, as in xkd.models
            if 'img_size' not in str(e):
                raise
            return timm.create_model(name, num_classes=NUM_CLASSES, **model_kwargs)


def save_as_reference_saver(model, path, name):
    """Through timm 0.6.5's CheckpointSaver, after one SGD step so that the optimizer holds state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()
    model(torch.randn(2, 3, IMG_SIZE, IMG_SIZE)).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    args = argparse.Namespace(model=name, dataset='cifar100', num_classes=NUM_CLASSES, img_size=IMG_SIZE,
                              input_size=None, teacher='swin_tiny_patch4_window7_224', distiller='ofa',
                              lr=0.05, epochs=300, model_ema=False)
    with tempfile.TemporaryDirectory() as folder:
        saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=folder, recovery_dir=folder)
        saver.save_checkpoint(epoch=0, metric=12.5)
        shutil.copyfile(os.path.join(folder, 'last.pth.tar'), path)


def main():
    assert timm.__version__ == '0.6.5', f'run this under timm 0.6.5, not {timm.__version__} (see the docstring)'
    torch.manual_seed(SEED)
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    torch.save(images, os.path.join(HERE, 'input.pt'))
    manifest = []
    for family, name, creator, arch_kwargs, model_kwargs in MODELS:
        torch.manual_seed(SEED)
        model = create_old_model(name, creator, arch_kwargs, model_kwargs).eval()
        stem = name + ('.pth.tar' if family == REFERENCE_SAVER_FAMILY else '.pth')
        path = os.path.join(HERE, stem)
        if family == REFERENCE_SAVER_FAMILY:
            save_as_reference_saver(model, path, name)
        else:
            torch.save(model.state_dict(), path)
        with torch.no_grad():
            logits = model(images)
        manifest.append(dict(family=family, model=name, file=stem, builder=creator, arch_kwargs=arch_kwargs,
                             model_kwargs=model_kwargs, num_classes=NUM_CLASSES, img_size=IMG_SIZE,
                             class_name=type(model).__name__, logits=logits.tolist()))
        print(f'{family:15s} {name:34s} {sum(p.numel() for p in model.parameters()):8d} parameters '
              f'{os.path.getsize(path) / 1024:7.1f} KiB')
    with open(os.path.join(HERE, 'manifest.json'), 'w') as f:
        json.dump(dict(timm_version=timm.__version__, torch_version=torch.__version__, input='input.pt',
                       models=manifest), f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    main()
