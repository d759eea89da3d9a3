"""Fixtures that write tiny data sets and checkpoints in the real on-disk formats."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import custom_model  # noqa: E402,F401  (registers our models with timm)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes minutes; run with `pytest -m slow`')


def write_cifar100(root, train_images=300, test_images=100, seed=0):
    """The python version of CIFAR-100 (cifar-100-python/{train,test,meta}) with random pixels."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    for name, count in (('train', train_images), ('test', test_images)):
        fine = [i % 100 for i in range(count)]
        entry = {'data': rng.randint(0, 256, size=(count, 3072), dtype=np.uint8), 'fine_labels': fine,
                 'coarse_labels': [label // 5 for label in fine],
                 'filenames': [f'{name}_{i}.png' for i in range(count)], 'batch_label': name}
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, 'meta'), 'wb') as f:
        pickle.dump({'fine_label_names': [f'class_{i}' for i in range(100)],
                     'coarse_label_names': [f'super_{i}' for i in range(20)]}, f)
    return root


def write_image_folder(root, classes=3, per_class=4, size=20, seed=0):
    """DATA/train/<class>/*.png and DATA/val/<class>/*.png."""
    rng = np.random.RandomState(seed)
    for split in ('train', 'val'):
        for c in range(classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return root


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A small ViT teacher's weights (demo_vit_teacher, depth 4), written once per test module."""
    import timm
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('demo_vit_teacher', num_classes=10, depth=4).state_dict(), path)
    return str(path)


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    return write_cifar100(str(tmp_path_factory.mktemp('cifar100')))


@pytest.fixture(scope='session')
def folder_dir(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp('folder')))


@pytest.fixture
def one_thread():
    """Small tensors gain nothing from a second thread, and threads spinning on each other are several
    times slower when the two cores are shared with another process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
