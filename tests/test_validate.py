"""validate.py states the protocol of its numbers, appends them to --results-file, and --use-ema falls back
to the plain weights as timm's validate.py does."""
import json
import logging
import os
import sys

import timm
import torch

import validate
from xkd import data, models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'old_timm'))
from tiny_models import MODELS, architecture_overrides  # noqa: E402

FAKE = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--workers', '0']


def last_json_line(capsys):
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_validate_reports_its_protocol_and_appends_to_the_results_file(tmp_path, capsys, monkeypatch):
    model = timm.create_model('demo_resnet_student', num_classes=10)
    weights = tmp_path / 'student.pth'
    torch.save(model.state_dict(), weights)
    configs = []
    data_config = data.data_config
    monkeypatch.setattr(data, 'data_config', lambda args: configs.append(data_config(args)) or configs[-1])
    results = tmp_path / 'results.jsonl'
    argv = FAKE + ['--model', 'demo_resnet_student', '--num-classes', '10', '--checkpoint', str(weights),
                   '--results-file', str(results)]
    capsys.readouterr()
    validate.main(argv)
    first, _ = last_json_line(capsys)
    validate.main(argv)
    second, _ = last_json_line(capsys)

    config = configs[-1]
    assert first['img_size'] == 32 and config['input_size'][-1] == 32
    assert (first['crop_pct'], first['interpolation']) == (config['crop_pct'], config['interpolation'])
    assert first['mean'] == list(config['mean']) and first['std'] == list(config['std'])
    assert first['param_count'] == round(models.count_parameters(model.parameters()) / 1e6, 4) > 0
    lines = results.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second]


def test_validate_use_ema_without_ema_weights_warns_and_uses_the_plain_ones(capsys):
    """The reference saver's file (timm 0.6.5, no EMA): model and classes from its Namespace of arguments."""
    _, name, creator, arch_kwargs, _ = next(entry for entry in MODELS if entry[0] == 'ConvNeXt')
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'old_timm', 'convnext_tiny.pth.tar')
    capsys.readouterr()
    with architecture_overrides(name, creator, arch_kwargs):
        validate.main(FAKE + ['--checkpoint', path])
        plain, _ = last_json_line(capsys)
        validate.main(FAKE + ['--checkpoint', path, '--use-ema'])
        ema, out = last_json_line(capsys)
    assert plain['model'] == 'convnext_tiny' and plain['count'] == 10
    assert "holds no EMA weights (no state_dict_ema or model_ema); --use-ema falls back to its plain weights" in out
    assert (ema['top1'], ema['loss']) == (plain['top1'], plain['loss'])


def test_use_ema_picks_the_ema_weights_timm_names(caplog):
    plain, ema = {'w': torch.zeros(1)}, {'w': torch.ones(1)}
    pick = models.checkpoint_state_dict
    assert pick({'state_dict': plain, 'state_dict_ema': ema}, 'f', '--checkpoint', use_ema=True) == ema
    assert pick({'state_dict': plain, 'model_ema': ema}, 'f', '--checkpoint', use_ema=True) == ema
    assert pick({'state_dict': plain, 'model_ema': ema}, 'f', '--checkpoint') == plain
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger='xkd.models'):
        assert pick({'model': {f'module.{k}': v for k, v in plain.items()}}, 'f', '--checkpoint', use_ema=True) == plain
    assert len(caplog.records) == 1 and 'falls back' in caplog.records[0].getMessage()
