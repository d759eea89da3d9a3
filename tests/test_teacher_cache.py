"""--teacher-cache (xkd/teacher_cache.py): a run that reads the teacher's outputs from the cache ends with the
weights of the run that wrote them and of a run without a cache, bit for bit; the teacher does not run in a
cached epoch; the key separates what must not be shared; damage is one line."""
import contextlib
import glob
import os

import numpy as np
import pytest
import timm
import torch

import custom_forward
import train
from custom_forward import forward_features
from xkd import models, teacher_cache
from xkd.errors import UserError
from xkd.run import run_cli

pytestmark = pytest.mark.usefixtures('one_thread')

BASE = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '2',
        '--warmup-epochs', '0', '--workers', '0', '--log-interval', '2']
# A CNN student with the CNN recipe; a token student with the vit_mlp recipe's augmentation (RandAugment,
# mixup, cutmix, random erasing).
SETUPS = {
    'cnn': ['--config', 'configs/cifar/cnn.yaml', '--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher',
            '--num-classes', '10'],
    'tokens': ['--config', 'configs/cifar/vit_mlp.yaml', '--model', 'demo_vit_teacher', '--teacher',
               'demo_resnet_student', '--num-classes', '10'],
}
METHOD_FLAGS = {'crd': ['--crd-k', '16']}


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('teachers')
    files = {}
    for name in ('demo_vit_teacher', 'demo_resnet_student'):
        torch.manual_seed(1)
        files[name] = str(root / f'{name}.pth')
        torch.save(timm.create_model(name, num_classes=10).state_dict(), files[name])
    return files


def run(tmp_path, setup, method, experiment, teachers, *extra):
    argv = BASE + SETUPS[setup] + ['--distiller', method, '--output', str(tmp_path), '--experiment', experiment,
                                   '--teacher-pretrained', teachers[SETUPS[setup][5]]] + METHOD_FLAGS.get(method, [])
    assert run_cli(train.main, argv + list(extra)) == 0
    return torch.load(tmp_path / experiment / 'last.pth.tar', weights_only=True)


def assert_same_weights(a, b):
    for part in ('state_dict', 'distiller'):
        flat_a, flat_b = flatten(a[part]), flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key, value in flat_a.items():
            assert torch.equal(value, flat_b[key]), (part, key)


def flatten(state, prefix=''):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}.'))
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = value
    return out


class TeacherCalls:
    """Counts the teacher's passes in the runs that follow: its forward, and forward_features on it."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.teachers = []
        real_create, real_features = models.create_teacher, custom_forward.forward_features

        def counted(args):
            teacher = real_create(args)
            teacher.register_forward_pre_hook(lambda *_: setattr(self, 'count', self.count + 1))
            self.teachers.append(teacher)
            return teacher

        def features(model, *args, **kwargs):
            if any(model is teacher for teacher in self.teachers):
                self.count += 1
                with hooks_off(model):
                    return real_features(model, *args, **kwargs)
            return real_features(model, *args, **kwargs)
        monkeypatch.setattr(train.models, 'create_teacher', counted)
        monkeypatch.setattr(custom_forward, 'forward_features', features)


@contextlib.contextmanager
def hooks_off(model):
    """forward_features may call the model's forward: count that pass once."""
    saved = dict(model._forward_pre_hooks)
    model._forward_pre_hooks.clear()
    try:
        yield
    finally:
        model._forward_pre_hooks.update(saved)


@pytest.mark.parametrize('setup', list(SETUPS))
@pytest.mark.parametrize('method', ['kd', 'ofa', 'rsd', 'hcd', 'crd'])
def test_a_cached_run_is_the_uncached_run_bit_for_bit(tmp_path, teachers, monkeypatch, setup, method):
    live = run(tmp_path, setup, method, 'live', teachers)
    calls = TeacherCalls(monkeypatch)
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    written = run(tmp_path, setup, method, 'write', teachers, *cache)
    assert calls.count == 2 * 4  # 2 epochs of 4 batches (no --eval-teacher): one teacher call per step
    read = run(tmp_path, setup, method, 'read', teachers, *cache)
    assert calls.count == 2 * 4, 'the teacher ran in a cached epoch'
    assert_same_weights(live, written)
    assert_same_weights(live, read)
    assert len(glob.glob(str(tmp_path / 'cache' / '*' / 'manifest.json'))) == 1


def test_forward_features_logits_are_the_forward_logits():
    """A cache written by a logits-only method (kd: the model's forward) serves a method that reads the
    logits from forward_features (hcd), so the two must be the same bits."""
    torch.manual_seed(0)
    for name in ('demo_vit_teacher', 'demo_resnet_student'):
        model = timm.create_model(name, num_classes=10).eval()
        image = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(model(image), forward_features(model, image)[0])


def test_methods_share_one_folder_and_another_key_reads_nothing_of_it(tmp_path, teachers, monkeypatch):
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    run(tmp_path, 'cnn', 'hcd', 'hcd', teachers, *cache)  # writes logits and embedding
    calls = TeacherCalls(monkeypatch)
    run(tmp_path, 'cnn', 'kd', 'kd', teachers, *cache)
    run(tmp_path, 'cnn', 'rsd', 'rsd', teachers, *cache)
    assert calls.count == 0  # both served from what hcd wrote
    folders = lambda: sorted(glob.glob(str(tmp_path / 'cache' / '*')))  # noqa: E731
    assert len(folders()) == 1
    other_teacher = str(tmp_path / 'other.pth')
    torch.manual_seed(5)
    torch.save(timm.create_model('demo_vit_teacher', num_classes=10).state_dict(), other_teacher)
    for i, extra in enumerate([['--seed', '7'], ['--img-size', '48'], ['--teacher-pretrained', other_teacher]]):
        before = calls.count
        run(tmp_path, 'cnn', 'kd', f'other{i}', teachers, *cache, *extra)
        assert calls.count == before + 8, extra  # the teacher ran every step: nothing of another key was read
        assert len(folders()) == 2 + i


def test_a_truncated_cache_file_is_one_line(tmp_path, teachers, capsys):
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    run(tmp_path, 'cnn', 'kd', 'write', teachers, *cache)
    (logits,) = glob.glob(str(tmp_path / 'cache' / '*' / 'epoch0001.logits.npy'))
    with open(logits, 'r+b') as f:
        f.truncate(os.path.getsize(logits) // 2)
    capsys.readouterr()
    argv = BASE + SETUPS['cnn'] + ['--distiller', 'kd', '--teacher-pretrained', teachers['demo_vit_teacher'],
                                   '--output', str(tmp_path), '--experiment', 'read'] + cache
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and f"teacher cache file '{logits}' is damaged" in err
    assert 'delete it' in err and 'leave --teacher-cache out' in err


def test_a_batch_the_cache_was_not_written_for_is_refused(tmp_path, teachers, capsys):
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    run(tmp_path, 'cnn', 'kd', 'write', teachers, *cache)
    (path,) = glob.glob(str(tmp_path / 'cache' / '*' / 'epoch0000.fingerprint.npy'))
    fingerprints = np.load(path)
    fingerprints[2, 0] += 1.0
    np.save(path, fingerprints)
    capsys.readouterr()
    argv = BASE + SETUPS['cnn'] + ['--distiller', 'kd', '--teacher-pretrained', teachers['demo_vit_teacher'],
                                   '--output', str(tmp_path), '--experiment', 'read'] + cache
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert 'epoch 0 step 2: the batch is not the one the cache was written for' in err


def test_stage_map_methods_run_live_and_say_so(tmp_path, teachers, monkeypatch, capsys):
    calls = TeacherCalls(monkeypatch)
    capsys.readouterr()
    run(tmp_path, 'cnn', 'fitnet', 'fitnet', teachers, '--teacher-cache', str(tmp_path / 'cache'))
    assert "--distiller fitnet reads the teacher's stage maps, which are not cached; the teacher runs live" in \
        capsys.readouterr().out
    assert calls.count == 8 and not os.path.exists(tmp_path / 'cache')


def test_two_writers_of_one_epoch_leave_whole_files_with_the_same_bytes(tmp_path, monkeypatch):
    """Two runs of one key writing the same epoch at once (two processes: two pids): each writes a temporary file
    of its own and renames it whole, so a reader never takes a partial file, and the bytes are the same."""
    images, logits = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    writers = {pid: teacher_cache.TeacherCache(str(tmp_path), {'k': 1}, ('logits',), 'float32', 2, 1)
               for pid in (1000, 2000)}

    def as_process(pid):
        monkeypatch.setattr(teacher_cache.os, 'getpid', lambda: pid)
        return writers[pid]

    for pid in writers:
        writer = as_process(pid)
        writer.start_epoch(0)
        writer.at_step(0)
        writer.serve(images, lambda: {'logits': logits})
    folder = writers[1000].folder
    assert len(glob.glob(os.path.join(folder, '*.logits.npy.tmp*'))) == 2  # one temporary file per writer
    as_process(1000).end_epoch()
    final = os.path.join(folder, 'epoch0000.logits.npy')
    first = open(final, 'rb').read()
    reader = teacher_cache.TeacherCache(str(tmp_path), {'k': 1}, ('logits',), 'float32', 2, 1)
    reader.start_epoch(0)
    assert reader.reading  # whole and readable while the second writer is still at work
    as_process(2000).end_epoch()
    assert open(final, 'rb').read() == first
    assert not glob.glob(os.path.join(folder, '*.tmp*'))


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision_caches_round_the_outputs(tmp_path, dtype):
    cache = teacher_cache.TeacherCache(str(tmp_path), {'k': dtype}, ('logits',), dtype, batch_size=2,
                                       steps_per_epoch=1)
    logits = torch.randn(2, 5)
    images = torch.randn(2, 3, 4, 4)
    cache.start_epoch(0)
    cache.at_step(0)
    assert cache.serve(images, lambda: {'logits': logits})['logits'] is logits
    cache.end_epoch()
    cache.start_epoch(0)
    cache.at_step(0)
    served = cache.serve(images, lambda: pytest.fail('the teacher ran'))['logits']
    assert served.dtype == torch.float32
    assert torch.equal(served, logits.to(getattr(torch, dtype)).float())


def test_train_sh_passes_the_cache_folder_from_the_environment(tmp_path, teachers):
    import subprocess
    from helpers import ROOT
    result = subprocess.run(['bash', 'train.sh', '1'] + BASE + SETUPS['cnn'] +
                            ['--distiller', 'kd', '--epochs', '1', '--teacher-pretrained', teachers['demo_vit_teacher'],
                             '--output', str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', 'TEACHER_CACHE': str(tmp_path / 'cache')})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(glob.glob(str(tmp_path / 'cache' / '*' / 'epoch0000.logits.npy'))) == 1


def test_a_resumed_run_reads_the_cache_and_ends_as_the_uninterrupted_run(tmp_path, teachers, monkeypatch):
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    whole = run(tmp_path, 'tokens', 'hcd', 'whole', teachers, *cache)  # writes epochs 0 and 1
    calls = TeacherCalls(monkeypatch)
    resumed = run(tmp_path, 'tokens', 'hcd', 'resumed', teachers, *cache, '--resume',
                  str(tmp_path / 'whole' / 'checkpoint-0.pth.tar'))
    assert calls.count == 0  # epoch 1 came from the cache
    assert_same_weights(whole, resumed)


def test_a_cache_written_by_one_method_serves_another_bit_for_bit(tmp_path, teachers, monkeypatch):
    """With random erasing, mixup and cutmix (the vit_mlp recipe), a method that draws random numbers of its own
    between batches (CRD samples its negatives) still sees the batches kd saw: the batch-level augmentation draws
    from generators of its own (engine.AugmentationRandomness), so the cache is shared across the table."""
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    run(tmp_path, 'tokens', 'hcd', 'writer', teachers, *cache)  # logits and embedding, for all methods below
    for method in ('crd', 'kd', 'rsd'):
        live = run(tmp_path, 'tokens', method, f'{method}-live', teachers)
        calls = TeacherCalls(monkeypatch)
        read = run(tmp_path, 'tokens', method, f'{method}-read', teachers, *cache)
        assert calls.count == 0, method
        assert_same_weights(live, read)


def test_two_processes_read_what_two_processes_wrote_bit_for_bit(tmp_path, teachers):
    """DDP (Gloo): each process writes and reads its own shard; the reading 2-process run ends with the weights of
    the 2-process run that wrote the cache and of a 2-process run without one."""
    import socket
    import subprocess
    import sys
    from helpers import ROOT

    def launch(experiment, *extra):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
                   'train.py'] + BASE + SETUPS['tokens'] + [
            '--distiller', 'hcd', '--teacher-pretrained', teachers['demo_resnet_student'], '--output', str(tmp_path),
            '--experiment', experiment, *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return torch.load(tmp_path / experiment / 'last.pth.tar', weights_only=True), result.stdout + result.stderr

    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    live, _ = launch('live')
    written, _ = launch('write', *cache)
    read, log = launch('read', *cache)
    assert 'epoch 1 read from the cache' in log
    assert len(glob.glob(str(tmp_path / 'cache' / '*' / 'epoch0001.rank1of2.embedding.npy'))) == 1
    assert_same_weights(live, written)
    assert_same_weights(live, read)


def test_sigkill_mid_epoch_with_the_cache_then_resume_auto_ends_as_the_uninterrupted_run(tmp_path, teachers):
    """SIGKILL while epoch 1 is being written to the cache: its partial files are never taken as complete;
    `--resume auto` writes epoch 1 again and ends with the weights of an uninterrupted run without a cache, and a
    run reading the now complete cache ends the same."""
    import signal
    import sys
    from helpers import run_command, sigkill_when_logged
    args = ['train.py', '--dataset', 'fake', '--fake-samples', '96', '--img-size', '32', '--batch-size', '8',
            '--workers', '2', '--model', 'demo_resnet_student', '--distiller', 'kd', '--teacher', 'demo_vit_teacher',
            '--teacher-pretrained', teachers['demo_vit_teacher'], '--epochs', '2', '--lr', '0.05',
            '--warmup-epochs', '1', '--log-interval', '1', '--output', str(tmp_path)]
    cache = ['--teacher-cache', str(tmp_path / 'cache')]
    run_command([sys.executable] + args + ['--experiment', 'full'])
    log = tmp_path / 'killed' / 'log.txt'
    status = sigkill_when_logged([sys.executable] + args + cache + ['--experiment', 'killed'], log, 'Train: 1 [ 4/12]')
    assert status == -signal.SIGKILL
    (folder,) = glob.glob(str(tmp_path / 'cache' / '*'))
    assert os.path.exists(os.path.join(folder, 'epoch0000.logits.npy'))
    assert not os.path.exists(os.path.join(folder, 'epoch0001.logits.npy'))  # partial: only its .tmp file
    assert glob.glob(os.path.join(folder, 'epoch0001.logits.npy.tmp*'))
    output = run_command([sys.executable] + args + cache + ['--experiment', 'killed', '--resume', 'auto'])
    assert 'at epoch 1' in output and 'epoch 1 computed by the teacher and written to the cache' in output
    output = run_command([sys.executable] + args + cache + ['--experiment', 'read'])
    assert 'epoch 1 read from the cache' in output
    full = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    for name in ('killed', 'read'):
        assert_same_weights(full, torch.load(tmp_path / name / 'last.pth.tar', weights_only=True))


def test_a_cache_filled_by_the_tool_serves_a_training_run(tmp_path, teachers, monkeypatch, capsys):
    """tools/teacher_cache.py with a run's command line writes every epoch (logits and embedding) with no
    student; the training run then calls the teacher zero times and ends as the run without a cache."""
    sys_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
    monkeypatch.syspath_prepend(sys_path)
    import teacher_cache as fill_tool
    live = run(tmp_path, 'tokens', 'crd', 'live', teachers)
    command = BASE + SETUPS['tokens'] + ['--teacher-pretrained', teachers['demo_resnet_student'],
                                         '--teacher-cache', str(tmp_path / 'cache')]
    capsys.readouterr()
    assert run_cli(fill_tool.main, command) == 0
    out = capsys.readouterr().out
    assert 'epoch 2/2 written' in out and 'MiB' in out
    assert run_cli(fill_tool.main, command) == 0  # a second fill finds every epoch there
    assert out.count('already in the cache') == 0 and 'epoch 1: already in the cache' in capsys.readouterr().out
    calls = TeacherCalls(monkeypatch)
    read = run(tmp_path, 'tokens', 'crd', 'read', teachers, '--teacher-cache', str(tmp_path / 'cache'))
    assert calls.count == 0
    assert_same_weights(live, read)
