"""Two processes (Gloo, CPU) with batch b end with the weights of one process with batch 2b.

The student is a small ViT (LayerNorm, no BatchNorm, whose per-process statistics would differ) and the
augmentation is off, so the two runs compute the same gradients on the same images. Each run also checks at
every step that both ranks hold identical weights (train.py does this at every --log-interval).
"""
import os
import re
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
    # The two ranks share one stdout, so their lines may run together: take each flat JSON object.
    ranks = {r['rank']: r for r in (json.loads(text) for text in re.findall(r'\{[^{}]*\}', out))}
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


# --- CRD's memory banks under DDP ------------------------------------------------------------------

def crd_bank_steps(num_data=40, batch=16, steps=5, feat_dim=8):
    """The same sequence of global batches (indices, student and teacher vectors, scores) for every caller."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        indices = torch.randperm(num_data, generator=generator)[:batch]
        vectors = [torch.nn.functional.normalize(torch.randn(batch, feat_dim, generator=generator), dim=1)
                   for _ in range(2)]
        scores = [torch.rand(batch, 5, generator=generator) for _ in range(2)]
        batches.append((indices, *vectors, *scores))
    return batches


def run_crd_memory(rank, world_size, port, out_dir):
    """Bind a ContrastMemory and apply the batches; each of `world_size` processes takes its share of each."""
    import torch.distributed as dist
    from distillers.crd import ContrastMemory
    if world_size > 1:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    memory = ContrastMemory(8)
    memory.bind(torch.arange(40) % 7, seed=3)
    for step, (indices, student, teacher, scores_student, scores_teacher) in enumerate(crd_bank_steps()):
        share = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
        if step == 0:
            memory.set_z(scores_student[share], scores_teacher[share])
        memory.update(indices[share], student[share], teacher[share], momentum=0.5)
    torch.save(memory.state_dict(), os.path.join(out_dir, f'memory-{world_size}-{rank}.pt'))
    if world_size > 1:
        dist.destroy_process_group()


def test_crd_banks_of_two_processes_equal_one_process_with_the_double_batch(tmp_path):
    """Every process adds every process's samples to its banks, so all replicas hold the banks of one
    process that saw the whole batch (the reference's ranks each wrote only their own samples)."""
    import torch.multiprocessing as mp
    mp.spawn(run_crd_memory, args=(2, free_port(), str(tmp_path)), nprocs=2)
    run_crd_memory(0, 1, None, str(tmp_path))
    one = torch.load(tmp_path / 'memory-1-0.pt', weights_only=True)
    for rank in range(2):
        two = torch.load(tmp_path / f'memory-2-{rank}.pt', weights_only=True)
        assert one.keys() == two.keys() and len(one) == 4
        worst = max((one[key] - two[key]).abs().max().item() for key in one)
        print(f'rank {rank}: largest difference of banks and Z, 2 processes vs 1: {worst:.2e}')
        assert worst <= 1e-6


def test_crd_run_of_two_processes_ends_with_the_banks_of_one_process(tmp_path, teacher_file):
    """The same through train.py: loader indices, all-gather inside the DDP forward, checkpointed banks.
    The learning rate is 0: the negatives are drawn per process, so any step would move the two runs'
    weights apart; with fixed weights the banks depend only on the images and their indices."""
    def crd_args(experiment, batch_size):
        args = train_args(tmp_path, experiment, batch_size, teacher_file)
        args[args.index('depth=2')] = 'depth=4'
        args[args.index('kd')] = 'crd'
        return args + ['--crd-k', '8', '--lr', '0', '--min-lr', '0', '--weight-decay', '0']
    run_command([sys.executable] + crd_args('one', 16))
    run_command([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}']
                + crd_args('two', 8))
    one = torch.load(tmp_path / 'one' / 'last.pth.tar', weights_only=True)['distiller']['memory']
    two = torch.load(tmp_path / 'two' / 'last.pth.tar', weights_only=True)['distiller']['memory']
    worst = max((one[key] - two[key]).abs().max().item() for key in ('bank_student', 'bank_teacher'))
    print(f'train.py, largest bank difference, 2 processes vs 1: {worst:.2e}')
    assert worst <= 1e-6
    from distillers.crd import ContrastMemory
    initial = ContrastMemory(128)
    initial.bind(torch.arange(64) % 10, seed=42)  # --fake-samples 64, train.py's default seed
    for key in ('bank_student', 'bank_teacher'):  # every sample was seen, so every row moved
        assert (one[key] - getattr(initial, key)).abs().amax(dim=1).min() > 1e-3, key
