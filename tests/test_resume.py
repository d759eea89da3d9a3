"""A run killed and resumed ends exactly where an uninterrupted run ends; checkpoints survive a kill mid-save."""

import pytest
import torch

import distillers
import train
from helpers import summary_rows
from xkd import checkpoint, engine
from xkd.errors import UserError

WITH_EXTRA_MODULES = [m for m in ('ofa', 'rsd', 'hcd', 'fitnet', 'correlation', 'crd')
                      if m in distillers.distiller_names()]
# Logit-only methods hold no state of their own: kd stands for them in the default run, the rest run with -m slow.
LOGIT_ONLY = [m for m in ('dkd', 'dist', 'rkd', 'bkd') if m in distillers.distiller_names()]
METHODS = (['vanilla', 'kd'] + [pytest.param(m, marks=pytest.mark.slow) for m in LOGIT_ONLY] + WITH_EXTRA_MODULES)


def base_args(output, teacher_file, method):
    return ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--workers', '0',
            '--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher', '--teacher-kwargs', 'depth=4',
            '--teacher-pretrained', teacher_file, '--distiller', method, '--epochs', '3', '--warmup-epochs', '2',
            '--lr', '0.05', '--model-ema', '--model-ema-decay', '0.9', '--mixup', '0.2', '--log-interval', '2',
            '--output', str(output)] + (['--crd-k', '64'] if method == 'crd' else [])


def kill_at_epoch(monkeypatch, dead_epoch):
    original = engine.train_one_epoch

    def dying(epoch, *args, **kwargs):
        if epoch == dead_epoch:
            raise KeyboardInterrupt('killed')
        return original(epoch, *args, **kwargs)
    monkeypatch.setattr(engine, 'train_one_epoch', dying)


@pytest.mark.parametrize('method', METHODS)
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, teacher_file, monkeypatch, method):
    args = base_args(tmp_path, teacher_file, method)
    train.main(args + ['--experiment', 'full'])
    with monkeypatch.context() as patch:
        kill_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train.main(args + ['--experiment', 'resumed'])
    assert len(summary_rows(tmp_path / 'resumed')) == 2
    train.main(args + ['--experiment', 'resumed', '--resume', 'auto'])

    full = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'last.pth.tar', weights_only=True)
    assert full['epoch'] == resumed['epoch'] == 2
    worst = max((full['state_dict'][k].float() - resumed['state_dict'][k].float()).abs().max().item()
                for k in full['state_dict'])
    print(f'{method}: largest student weight difference, resumed vs uninterrupted: {worst:.2e}')
    for key in full['state_dict']:
        assert torch.allclose(full['state_dict'][key].float(), resumed['state_dict'][key].float(), atol=1e-6), key
    for key in full['state_dict_ema']:
        assert torch.allclose(full['state_dict_ema'][key].float(), resumed['state_dict_ema'][key].float(),
                              atol=1e-6), key
    assert full['distiller'].keys() == resumed['distiller'].keys()
    if method in WITH_EXTRA_MODULES:
        assert full['distiller'], 'a method with extra modules saved none'
    for name, state in full['distiller'].items():
        for key, tensor in state.items():
            assert torch.allclose(tensor.float(), resumed['distiller'][name][key].float(), atol=1e-6), (name, key)

    full_rows, resumed_rows = summary_rows(tmp_path / 'full'), summary_rows(tmp_path / 'resumed')
    assert len(full_rows) == len(resumed_rows) == 3
    for a, b in zip(full_rows, resumed_rows):
        assert a.keys() == b.keys()
        for column in a:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6), column
    assert float(full_rows[0]['lr']) < float(full_rows[1]['lr'])  # warm-up carried across the resume


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, teacher_file):
    result = train.main(base_args(tmp_path, teacher_file, 'vanilla') + ['--epochs', '1', '--warmup-epochs', '0',
                                                                        '--experiment', 'new',
                                                                        '--resume', 'auto'])
    assert result['output_dir'] == str(tmp_path / 'new') and len(summary_rows(tmp_path / 'new')) == 1


def test_kill_during_save_leaves_last_checkpoint_whole(tmp_path, teacher_file, monkeypatch):
    args = base_args(tmp_path, teacher_file, 'kd') + ['--experiment', 'run']
    real_save = torch.save
    calls = []

    def dying_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's save: half a file, then the process dies
            with open(path, 'wb') as f:
                f.write(b'PK\x03\x04 partial')
            raise KeyboardInterrupt('killed while saving')
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(checkpoint.torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(checkpoint.torch, 'save', real_save)
    last = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=True)
    assert last['epoch'] == 0
    result = train.main(args + ['--resume', 'auto'])
    assert len(summary_rows(result['output_dir'])) == 3


def test_truncated_checkpoint_is_named_damaged_with_an_alternative(tmp_path, teacher_file):
    args = base_args(tmp_path, teacher_file, 'kd') + ['--experiment', 'run', '--epochs', '2', '--warmup-epochs', '1']
    train.main(args)
    last = tmp_path / 'run' / 'last.pth.tar'
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"last.pth.tar' is damaged.*checkpoint-\d.pth.tar"):
        train.main(args + ['--resume', str(last)])


def vanilla_args(output, experiment, epochs, *extra):
    return ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--workers', '0',
            '--model', 'demo_resnet_student', '--distiller', 'vanilla', '--epochs', str(epochs), '--lr', '0.1',
            '--min-lr', '0', '--warmup-epochs', '0', '--sched', 'cosine', '--model-ema', '--model-ema-decay', '0.5',
            '0.9', '--output', str(output), '--experiment', experiment, *extra]


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path, capsys):
    """The command line is the plan: a 1-epoch run resumed with --epochs 3 trains epochs 1 and 2 with the
    learning rates of a run planned for 3 epochs from the start (not at the minimum of the old schedule)."""
    train.main(vanilla_args(tmp_path, 'planned', 3))
    train.main(vanilla_args(tmp_path, 'extended', 1))
    capsys.readouterr()
    train.main(vanilla_args(tmp_path, 'extended', 3, '--resume', 'auto'))
    log = capsys.readouterr().out
    changes = [line for line in log.splitlines() if 'Arguments changed since' in line]
    assert len(changes) == 1 and changes[0].endswith("epochs 1 -> 3"), changes
    planned, extended = summary_rows(tmp_path / 'planned'), summary_rows(tmp_path / 'extended')
    assert [float(r['lr']) for r in extended] == [float(r['lr']) for r in planned]
    assert [float(r['lr']) for r in planned] == pytest.approx([0.1, 0.075, 0.025])
    # Epoch 0's learning rate is the same in both plans, so the whole runs are the same, both EMAs included.
    a = torch.load(tmp_path / 'planned' / 'last.pth.tar', weights_only=True)
    b = torch.load(tmp_path / 'extended' / 'last.pth.tar', weights_only=True)
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    assert sorted(a['state_dict_emas']) == ['0.5', '0.9']
    for decay, state in a['state_dict_emas'].items():
        for key in state:
            assert torch.equal(state[key], b['state_dict_emas'][decay][key]), (decay, key)
    assert {'eval_ema0.5_top1', 'eval_ema0.9_top1'} <= set(planned[0])


def test_resume_with_another_lr_and_weight_decay_uses_them(tmp_path, capsys):
    train.main(vanilla_args(tmp_path, 'run', 1))
    capsys.readouterr()
    train.main(vanilla_args(tmp_path, 'run', 2, '--resume', 'auto', '--lr', '0.2', '--weight-decay', '0.01'))
    log = capsys.readouterr().out
    assert "epochs 1 -> 2; lr 0.1 -> 0.2; weight_decay 2e-05 -> 0.01" in log
    rows = summary_rows(tmp_path / 'run')
    assert [float(r['lr']) for r in rows] == pytest.approx([0.1, 0.1])  # cosine over 2 epochs from 0.2: 0.1 at 1
    last = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=True)
    # timm keeps biases and norms in a group without weight decay; the other group takes the new value.
    assert sorted(group['weight_decay'] for group in last['optimizer']['param_groups']) == [0.0, 0.01]
    assert last['optimizer']['state'], 'the optimizer moments were dropped'


def test_sigkill_mid_epoch_with_loader_workers_then_resume_auto_ends_with_the_uninterrupted_weights(tmp_path):
    """A real kill: SIGKILL while epoch 1 runs (loader workers busy), then `--resume auto`."""
    import signal
    import sys
    from helpers import run_command, sigkill_when_logged
    args = ['train.py', '--dataset', 'fake', '--fake-samples', '96', '--img-size', '32', '--batch-size', '8',
            '--workers', '2', '--model', 'demo_resnet_student', '--distiller', 'vanilla', '--epochs', '2',
            '--lr', '0.05', '--warmup-epochs', '1', '--log-interval', '1', '--output', str(tmp_path)]
    run_command([sys.executable] + args + ['--experiment', 'full'])
    log = tmp_path / 'killed' / 'log.txt'
    status = sigkill_when_logged([sys.executable] + args + ['--experiment', 'killed'], log, 'Train: 1 [ 2/12]')
    assert status == -signal.SIGKILL
    assert torch.load(tmp_path / 'killed' / 'last.pth.tar', weights_only=True)['epoch'] == 0  # killed in epoch 1
    output = run_command([sys.executable] + args + ['--experiment', 'killed', '--resume', 'auto'])
    assert 'Resumed from' in output and 'at epoch 1' in output
    full = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)['state_dict']
    resumed = torch.load(tmp_path / 'killed' / 'last.pth.tar', weights_only=True)['state_dict']
    worst = max((full[k].float() - resumed[k].float()).abs().max().item() for k in full)
    print(f'SIGKILL mid-epoch then --resume auto: largest weight difference to the uninterrupted run {worst:.2e}')
    assert worst == 0.0
    assert len(summary_rows(tmp_path / 'killed')) == 2
