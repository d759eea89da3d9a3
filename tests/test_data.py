"""The data path: every recipe's augmentation survives thousands of images, a failing sample names itself,
evaluation follows the student's own timm data configuration."""
import glob
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torch.utils.data import Dataset

import train
from helpers import ROOT, cli_error
from xkd import data
from xkd.data import one_line
from xkd.config import parse_args
from xkd.run import resolve_input_size

RECIPES = sorted(path for path in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True)
                 if os.path.basename(path) != 'experiments.yaml')


def recipe_args(path, *extra):
    """The arguments of a recipe after train.py's own resolution of the input size."""
    args = parse_args(['--config', path, *extra])
    args.input_size = resolve_input_size(args, args.model)
    return args


# ---------------------------------------------------------------- many images through each recipe

def test_every_recipe_is_found():
    names = {os.path.relpath(path, ROOT) for path in RECIPES}
    assert {'configs/cifar/cnn.yaml', 'configs/cifar/vit_mlp.yaml', 'configs/imagenet/cnn.yaml',
            'configs/imagenet/vit_mlp.yaml', 'configs/demo/student.yaml', 'configs/demo/teacher.yaml',
            'configs/cifar/teachers/swin_tiny.yaml'} <= names


def test_every_recipe_transforms_thousands_of_cifar_sized_images():
    """Pillow 13 refuses timm's RandAugment posterize(0 bits): 5 in 3,000 random 32 px images hit it, so
    a test with a few images passes while a CIFAR-100 epoch dies. The augmentations do not depend on the
    output size, so 32 px keeps this fast."""
    rng = np.random.RandomState(0)
    images = [Image.fromarray(pixels) for pixels in rng.randint(0, 256, size=(3000, 32, 32, 3), dtype=np.uint8)]
    failures, start = [], time.time()
    for path in RECIPES:
        transform, _ = data.create_transforms(recipe_args(path, '--img-size', '32'))
        for i, image in enumerate(images):
            try:
                assert transform(image).shape == (3, 32, 32)
            except Exception as e:  # collect them all, so one run names every broken recipe
                failures.append(f'{os.path.relpath(path, ROOT)} image {i}: {type(e).__name__}: {e}')
    print(f'{len(RECIPES)} recipes x {len(images)} images in {time.time() - start:.1f} s')
    assert not failures, '\n'.join(failures[:20])


# ---------------------------------------------------------------- a sample that fails to load

class CorruptAt(Dataset):
    """A dataset whose sample `bad` is not an image, so the first transform step raises on it."""

    def __init__(self, dataset, bad):
        self.dataset, self.bad, self.targets = dataset, bad, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return ('not an image' if i == self.bad else image), target


def test_failing_sample_names_index_and_transform_step():
    fake = data.FakeDataset(8, 2)
    transform, _ = data.create_transforms(recipe_args(os.path.join(ROOT, 'configs/cifar/vit_mlp.yaml'),
                                                      '--img-size', '32'))
    dataset = data.TransformedDataset(CorruptAt(fake, 5), transform)
    assert dataset[4][0].shape == (3, 32, 32)
    with pytest.raises(data.DataLoadingError, match=r'sample 5 of the CorruptAt set failed in transform step '
                                                    r'RandomResizedCropAndInterpolation\(size=\(32, 32\)'):
        dataset[5]


def test_failing_sample_in_a_worker_stops_the_run_naming_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8',
            '--workers', '1', '--model', 'demo_resnet_student', '--epochs', '1', '--output', str(tmp_path),
            '--experiment', 'run']
    train.main(argv)
    original = data.create_datasets

    def with_corrupt_sample(args):
        train_set, val_set = original(args)
        return CorruptAt(train_set, 13), val_set
    monkeypatch.setattr(data, 'create_datasets', with_corrupt_sample)
    err = cli_error(capsys, argv[:-5] + ['2', '--output', str(tmp_path), '--experiment', 'run', '--resume', 'auto'])
    last = os.path.join(str(tmp_path), 'run', 'last.pth.tar')
    assert 'sample 13 of the CorruptAt set failed in transform step RandomResizedCropAndInterpolation' in err
    assert 'TypeError' in err and 'stopped in epoch 1' in err
    assert f"the last good checkpoint is '{last}'" in err
    assert 'Traceback' not in err


# ---------------------------------------------------------------- evaluation as the reference does it

def cifar_eval_transform(*extra, model):
    args = parse_args(['--config', os.path.join(ROOT, 'configs/cifar/cnn.yaml'), '--model', model, *extra])
    args.input_size = resolve_input_size(args, args.model)
    return data.eval_transform(data.data_config(args))


def by_hand(resize, interpolation):
    return transforms.Compose([transforms.Resize(resize, interpolation=interpolation), transforms.CenterCrop(224),
                               transforms.ToTensor(), transforms.Normalize(data.CIFAR100_MEAN, data.CIFAR100_STD)])


@pytest.mark.parametrize('model, resize, interpolation', [
    ('resnet18', 256, InterpolationMode.BILINEAR),                # timm 0.6.5's resnet18: crop_pct 0.875, bilinear
    ('deit_tiny_patch16_224', 248, InterpolationMode.BICUBIC),   # crop_pct 0.9, bicubic
])
def test_cifar100_evaluates_with_the_students_data_configuration(model, resize, interpolation):
    ours, hand = cifar_eval_transform(model=model), by_hand(resize, interpolation)
    resizes = [t for t in ours.transforms if isinstance(t, transforms.Resize)]
    crops = [t for t in ours.transforms if isinstance(t, transforms.CenterCrop)]
    assert [(t.size, t.interpolation) for t in resizes] == [(resize, interpolation)]
    assert [t.size for t in crops] == [(224, 224)]
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, size=(32, 32, 3), dtype=np.uint8))
    assert torch.equal(ours(image), hand(image))


def test_flags_override_the_students_data_configuration():
    ours = cifar_eval_transform('--crop-pct', '1.0', '--interpolation', 'bilinear', '--mean', '0.5', '0.5', '0.5',
                                '--std', '0.5', '0.5', '0.5', model='deit_tiny_patch16_224')
    hand = transforms.Compose([transforms.Resize(224, interpolation=InterpolationMode.BILINEAR),
                               transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    image = Image.fromarray(np.random.RandomState(2).randint(0, 256, size=(32, 32, 3), dtype=np.uint8))
    assert torch.equal(ours(image), hand(image))
    args = parse_args(['--config', os.path.join(ROOT, 'configs/cifar/cnn.yaml'), '--model', 'resnet18',
                       '--img-size', '64'])
    args.input_size = resolve_input_size(args, args.model)
    assert data.data_config(args)['input_size'] == (3, 64, 64)


def test_train_interpolation_is_the_references_random_unless_emptied():
    args = recipe_args(os.path.join(ROOT, 'configs/cifar/cnn.yaml'), '--model', 'resnet18')
    crop = data.create_transforms(args)[0].transforms[0]
    assert crop.interpolation == (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    args = recipe_args(os.path.join(ROOT, 'configs/cifar/cnn.yaml'), '--model', 'resnet18', '--train-interpolation', '')
    assert data.create_transforms(args)[0].transforms[0].interpolation == InterpolationMode.BILINEAR


def test_validate_resolves_the_same_configuration_as_train():
    import validate
    for model in ('resnet18', 'mobilenetv2_100', 'deit_tiny_patch16_224', 'swin_pico_patch4_window7_224',
                  'swin_nano_patch4_window7_224', 'resmlp_12_224'):
        train_args = recipe_args(os.path.join(ROOT, 'configs/cifar/cnn.yaml'), '--model', model)
        val_args = validate.build_parser().parse_args(['--dataset', 'cifar100', '--model', model,
                                                       '--checkpoint', 'x.pth'])
        val_args.input_size = resolve_input_size(val_args, model)
        config = data.data_config(val_args)
        assert config == data.data_config(train_args)
        print(f"{model}: {one_line(data.eval_transform(config))}")
