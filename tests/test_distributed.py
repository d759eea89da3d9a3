"""Two processes (Gloo, CPU) with batch b end with the weights of one process with batch 2b.

The student is a small ViT (LayerNorm, no BatchNorm, whose per-process statistics would differ) and the
augmentation is off, so the two runs compute the same gradients on the same images. Each run also checks at
every step that both ranks hold identical weights (train.py does this at every --log-interval).
"""
import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
from helpers import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('demo_resnet_student', num_classes=10).state_dict(), path)
    return str(path)


def train_args(output, experiment, batch_size, teacher_file):
    return ['train.py', '--dataset', 'fake', '--fake-samples', '64', '--img-size', '32', '--workers', '0',
            '--model', 'demo_vit_teacher', '--model-kwargs', 'depth=2', 'embed_dim=48',
            '--teacher', 'demo_resnet_student', '--teacher-pretrained', teacher_file, '--distiller', 'kd',
            '--batch-size', str(batch_size), '--epochs', '2', '--lr', '0.05', '--weight-decay', '0.01',
            '--scale', '1', '1', '--ratio', '1', '1', '--hflip', '0', '--color-jitter', '0',
            '--log-interval', '1', '--output', str(output), '--experiment', experiment]


def student_weights(run_dir):
    return torch.load(os.path.join(run_dir, 'last.pth.tar'), weights_only=True)['state_dict']


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f'largest weight difference between the runs: {worst:.2e}')
    assert worst <= atol, f'largest weight difference {worst:.2e}'


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, teacher_file):
    run_command([sys.executable] + train_args(tmp_path, 'one', 16, teacher_file))
    out = run_command([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                       f'--master_port={free_port()}']
              + train_args(tmp_path, 'two', 8, teacher_file))
    assert '2 process(es)' in out
    assert_same_weights(student_weights(tmp_path / 'one'), student_weights(tmp_path / 'two'))
    # Only rank 0 writes: one run folder, one log.
    assert sorted(os.listdir(tmp_path)) == ['one', 'two']


def test_slurm_environment_starts_the_same_run(tmp_path, teacher_file):
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'SLURM_PROCID': str(rank), 'SLURM_NTASKS': '2',
               'SLURM_LOCALID': str(rank), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': port}
        for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
            env.pop(name, None)
        processes.append(subprocess.Popen([sys.executable] + train_args(tmp_path, 'slurm', 8, teacher_file),
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
    assert '2 process(es)' in outputs[0]
    run_command([sys.executable] + train_args(tmp_path, 'one', 16, teacher_file))
    assert_same_weights(student_weights(tmp_path / 'one'), student_weights(tmp_path / 'slurm'))


DIST_BN_SCRIPT = '''
import json, sys
import torch
from xkd.distributed import distribute_bn, init_distributed
env = init_distributed()
torch.manual_seed(env.rank)
bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(env.rank + 1.0)
bn.running_var.fill_(10.0 * (env.rank + 1))
distribute_bn([torch.nn.Sequential(bn)], env, sys.argv[1])
print(json.dumps({'rank': env.rank, 'mean': bn.running_mean.tolist(), 'var': bn.running_var.tolist()}))
torch.distributed.destroy_process_group()
'''


@pytest.mark.parametrize('mode, mean, var', [('reduce', 1.5, 15.0), ('broadcast', 1.0, 10.0), ('', None, None)])
def test_dist_bn_averages_or_broadcasts_batchnorm_statistics(tmp_path, mode, mean, var):
    import json
    script = tmp_path / 'dist_bn.py'
    script.write_text(DIST_BN_SCRIPT)
    out = run_command([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                       f'--master_port={free_port()}', str(script), mode], env={'PYTHONPATH': ROOT})
    ranks = {r['rank']: r for r in (json.loads(line) for line in out.splitlines() if line.startswith('{'))}
    for rank in (0, 1):
        expected_mean = mean if mean is not None else rank + 1.0
        expected_var = var if var is not None else 10.0 * (rank + 1)
        assert ranks[rank]['mean'] == [expected_mean] * 3 and ranks[rank]['var'] == [expected_var] * 3


def test_dist_bn_in_a_two_process_run(tmp_path, teacher_file):
    """A BatchNorm student: --dist-bn reduce saves statistics other than rank 0's own (--dist-bn ''), and
    does not change the training itself."""
    args = ['train.py', '--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--workers', '0',
            '--model', 'demo_resnet_student', '--distiller', 'vanilla', '--batch-size', '8', '--epochs', '1',
            '--output', str(tmp_path)]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2']
    run_command(launch + [f'--master_port={free_port()}'] + args + ['--experiment', 'reduce', '--dist-bn', 'reduce'])
    run_command(launch + [f'--master_port={free_port()}'] + args + ['--experiment', 'own', '--dist-bn', ''])
    reduced, own = student_weights(tmp_path / 'reduce'), student_weights(tmp_path / 'own')
    stats = [k for k in own if k.endswith('running_mean') or k.endswith('running_var')]
    assert stats and any(not torch.equal(reduced[k], own[k]) for k in stats)
    assert all(torch.equal(reduced[k], own[k]) for k in own if k not in stats and 'num_batches' not in k)
