"""util/plugins.py: code of one's own, from a file outside the repository, without editing it. A backbone
whose names differ from the MAE ViT's (tests/data/toy_backbone_plugin.py, copied elsewhere) runs the
baseline, TTT-MAE under every rule for which parameters adapt, and online TTT-MAE, from checkpoints saved
as the released scripts save theirs; the docs' loss plugin runs as written; plugins are recorded by their
SHA-256; a bad plugin is one line."""
import argparse
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, check_error_line, run_inprocess, run_script
from models_mae import build_model
from test_main_test_time_training import per_image, script_args
from util.io import file_sha256
from util.plugins import load_plugin

TOY = os.path.join(REPO, 'tests', 'data', 'toy_backbone_plugin.py')


def released_checkpoint(path, state, **extra):
    """As the released util/misc.save_model writes them."""
    torch.save({'model': state, 'optimizer': {}, 'epoch': 0, 'scaler': {}, 'args': argparse.Namespace(model='toy'),
                **extra}, path)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """The toy backbone's plugin in a folder of its own, and its MAE and probe checkpoints."""
    root = tmp_path_factory.mktemp('elsewhere')
    plugin = root / 'my_backbone.py'
    shutil.copy(TOY, plugin)
    load_plugin(str(plugin))
    torch.manual_seed(0)
    model = build_model('toy_backbone', num_classes=2)
    parts, state = model.parts(), model.state_dict()
    assert not any(k.startswith(('blocks', 'decoder', 'classifier', 'head')) for k in state)  # not the MAE's names
    released_checkpoint(root / 'mae.pth', {k: v for k, v in state.items() if not k.startswith(parts.head)})
    released_checkpoint(root / 'probe.pth', {k: v for k, v in state.items() if not k.startswith(parts.decoder_side)},
                        classes=['class_a', 'class_b'])
    return str(plugin), (str(root / 'mae.pth'), str(root / 'probe.pth'))


def toy_command(script, toy, data, out, *extra):
    plugin, checkpoints = toy
    command = script_args(script, checkpoints, data, out, '--plugin', plugin, *extra)
    command[command.index(TINY)] = 'toy_backbone'
    return command


def test_a_backbone_of_ones_own_runs_the_baseline_ttt_and_online(toy, image_folder, tmp_path):
    data, ttt = f'{image_folder}/val', ['--steps_per_example', '2', '--batch_size', '4', '--lr', '0.05', '--single_crop']
    run_inprocess(toy_command('test_without_adaptation.py', toy, data, tmp_path / 'baseline'))
    baseline = per_image(tmp_path / 'baseline')
    runs = {}
    for rule in ('encoder', 'all', 'encoder_no_cls_no_msk', 'reached', 'norm', 'bias', 'last:1', 'lora:2'):
        run_inprocess(toy_command('main_test_time_training.py', toy, data, tmp_path / rule, *ttt, '--finetune_mode', rule))
        runs[rule] = per_image(tmp_path / rule)
    for rule, records in runs.items():
        assert np.array_equal(records['pred'][:, 0], baseline['pred'][:, 0]), rule  # step 0: no adaptation
        np.testing.assert_allclose(records['ce_loss'][:, 0], baseline['ce_loss'][:, 0], rtol=1e-5)
        assert records['recon_loss'].shape == (16, 2) and np.array_equal(records['objective'], records['recon_loss'])
        if rule != 'encoder':  # each rule adapts other weights: the second step's loss tells them apart
            assert not np.allclose(records['recon_loss'][:, 1], runs['encoder']['recon_loss'][:, 1], rtol=1e-5), rule
    np.testing.assert_array_equal(runs['lora:2']['recon_loss'][:, 0], runs['encoder']['recon_loss'][:, 0])  # B = 0
    # the stopping rules read the objective, whatever the loss is called
    run_inprocess(toy_command('main_test_time_training.py', toy, data, tmp_path / 'stop', *ttt, '--stop_rule',
                              'plateau:0.5', '--steps_per_example', '3'))
    assert set(per_image(tmp_path / 'stop')['stop_step']) <= {2, 3}
    # online, with its defaults: the decoder side (dec, mask_tok) at the lr, the encoder at 0.1x
    run_inprocess(toy_command('main_online_ttt.py', toy, data, tmp_path / 'online', '--batch_size', '4'))
    online = per_image(tmp_path / 'online')
    assert sorted(online['position']) == list(range(16)) and np.all(online['weight_distance'] > 0)


def test_plugins_are_recorded_and_a_changed_one_is_another_run(toy, image_folder, tmp_path):
    plugin, checkpoints = toy
    changed = tmp_path / 'copy' / 'my_backbone.py'  # a copy of its own, changed below
    changed.parent.mkdir()
    shutil.copy(plugin, changed)
    command = toy_command('main_test_time_training.py', (str(changed), checkpoints), f'{image_folder}/val', tmp_path / 'o',
                          '--steps_per_example', '1', '--batch_size', '2', '--single_crop', '--max_examples', '2')
    run_inprocess(command)
    import json
    with open(tmp_path / 'o' / 'run_config.json') as f:
        recorded = json.load(f)
    assert recorded['plugin_files'] == [{'path': str(changed), 'sha256': file_sha256(changed)}]
    os.remove(tmp_path / 'o' / 'results.json')  # as if it had been stopped: a rerun continues it...
    run_inprocess(command)
    os.remove(tmp_path / 'o' / 'results.json')
    changed.write_text(changed.read_text() + '\n# changed\n')  # ...unless the plugin changed
    result = run_inprocess(command, check=False)
    check_error_line(result.returncode, result.stdout, result.stderr, ['holds results of a different run', 'plugin_files'])


def docs_plugin():
    """The plugin file of docs/method.md's "Extending" section, as a user copies it."""
    with open(os.path.join(REPO, 'docs', 'method.md')) as f:
        blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
    plugin, = [b for b in blocks if 'register_model' in b]
    return plugin


def test_the_docs_loss_plugin_runs_from_a_file_of_ones_own(checkpoints, image_folder, tmp_path):
    """The docs' spatial total variation, at the tests' model size: mae + weight x tv minimised and recorded."""
    source = docs_plugin().replace('mae_vit_large_patch16', TINY)
    (tmp_path / 'my_loss.py').write_text(source)
    out = tmp_path / 'o'
    command = script_args('main_test_time_training.py', checkpoints, f'{image_folder}/val', out, '--plugin',
                          str(tmp_path / 'my_loss.py'), '--steps_per_example', '2', '--batch_size', '4',
                          '--single_crop', '--norm_pix_loss', '--max_examples', '4')
    command[command.index(TINY)] = f'{TINY}_tv'
    run_script(command)  # a fresh process: the plugin is imported from the command line alone
    records = per_image(out)
    weight = float(re.search(r"test_time_loss_weights = \{'tv': ([\d.]+)\}", source).group(1))
    assert np.all(records['tv_loss'] > 0)
    np.testing.assert_allclose(records['objective'], records['mae_loss'] + weight * records['tv_loss'], rtol=1e-6)


def test_the_docs_total_variation_is_spatial():
    """Neighbours on the image grid, not patch tokens in raster order: an image constant along each row has
    no vertical variation, and a horizontal ramp only its step per pixel."""
    namespace = {}
    exec(docs_plugin().replace('mae_vit_large_patch16', TINY), namespace)
    image = torch.arange(16.).view(1, 1, 1, 16).expand(2, 3, 16, 16)  # a ramp along the width
    tv = namespace['spatial_total_variation'](image)
    assert tv.item() == pytest.approx(1.)  # 1 per pixel to the right, 0 downwards


@pytest.mark.parametrize('flags, fragment', [
    (['--plugin', '/no/such/plugin.py'], '--plugin /no/such/plugin.py: file not found'),
    (['--plugin', 'no_such_module_anywhere'], '--plugin no_such_module_anywhere: no such module'),
    (['--finetune_mode', 'sideways'], "unknown --finetune_mode 'sideways'; choices: encoder, all, encoder_no_cls_no_msk, "
                                      "reached, norm, bias, last:..., lora:..."),
    (['--finetune_mode', 'lora:0'], '--finetune_mode lora:0: the rank R must be 1 or more, got 0'),
    (['--finetune_mode', 'last:two'], "--finetune_mode last:two: invalid literal for int()"),
    (['--finetune_mode', 'encoder:3'], '--finetune_mode encoder takes no parameter'),
    (['--loss_weight', 'tv'], '--loss_weight takes NAME=W with W a number >= 0'),
    (['--objective', 'sharpness'], "unknown objective 'sharpness'; choices: mae, entropy, memo"),
])
def test_bad_plugins_and_extension_flags_are_one_line(capsys, flags, fragment):
    from test_cli import parse_error
    line = parse_error(capsys, 'main_test_time_training', *flags)
    assert fragment in line, line


def test_a_plugin_that_raises_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    from test_cli import parse_error
    broken = tmp_path / 'broken.py'
    broken.write_text('import torch\nraise RuntimeError("the lab server is down")\n')
    line = parse_error(capsys, 'main_online_ttt', '--plugin', str(broken))
    assert f'{broken} raised RuntimeError: the lab server is down' in line
    (tmp_path / 'lab').mkdir()  # a package whose __init__ raises, named as a module
    (tmp_path / 'lab' / '__init__.py').write_text('raise RuntimeError("no licence")\n')
    (tmp_path / 'lab' / 'losses.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path))
    line = parse_error(capsys, 'main_online_ttt', '--plugin', 'lab.losses')
    assert '--plugin lab.losses: importing it raised RuntimeError: no licence' in line
    assert 'a module built into Python' in parse_error(capsys, 'main_online_ttt', '--plugin', 'sys')


@pytest.mark.parametrize('flags, fragment', [
    (['--finetune_mode', 'last:3'], '--finetune_mode last:3: the encoder has 2 blocks'),
    (['--loss_weight', 'tv=0.5'], '--loss_weight tv: --objective mae with --model mae_vit_micro_patch4 has no loss of '
                                  'that name (its losses: mae)'),
])
def test_what_depends_on_the_model_is_one_line_before_any_image(user_error, checkpoints, image_folder, tmp_path, flags,
                                                                  fragment):
    user_error(script_args('main_test_time_training.py', checkpoints, f'{image_folder}/val', tmp_path / 'o', *flags),
               fragment)
    assert not (tmp_path / 'o' / 'per_image.npz').exists()


def test_pretraining_and_probing_record_their_plugins(image_folder, tmp_path):
    plugin = tmp_path / 'nothing_much.py'
    plugin.write_text('"""A plugin that registers nothing."""\n')
    out = tmp_path / 'pre'
    result = run_inprocess([sys.executable, 'main_pretrain.py', '--data_path', image_folder, '--model', TINY,
                            '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0',
                            '--device', 'cpu', '--output_dir', str(out), '--plugin', str(plugin)])
    recorded = [{'path': str(plugin), 'sha256': file_sha256(plugin)}]
    assert torch.load(out / 'checkpoint-final.pth', weights_only=False)['args'].plugin_files == recorded
    assert f"'plugin_files': {recorded!r}" in result.stdout  # the settings line of the log
