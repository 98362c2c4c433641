"""util/finetune_modes.py: which parameters each rule adapts, on the MAE ViT and on a backbone with other names
(each asks the model's parts()); what the gradient reaches; last:K's backward; LoRA's adapters; the fast
trainer under every rule, bit for bit the default one with K = 1."""
import copy

import numpy as np
import pytest
import torch

import engine_test_time as ttt
from conftest import REPO, tiny_model
from engine_fast import FastTrainer
from engine_online import OnlineTrainer
from models_mae import build_model
from test_engine_online import online_args
from test_engine_test_time import adapt_all, adapted, items_of, stacked, test_folder, ttt_args  # noqa: F401 (fixtures)
from util.finetune_modes import choose_parameters
from util.plugins import load_plugin

RULES = ['encoder', 'all', 'encoder_no_cls_no_msk', 'reached', 'norm', 'bias', 'last:1', 'lora:2', 'lora:3:6']


def chosen(model, rule, objective='mae'):
    return set(ttt.TestTimeTrainer(model, ttt_args('--finetune_mode', rule, '--objective', objective), 'cpu').params)


def test_the_papers_rules_choose_as_before():
    names = {n for n, _ in tiny_model().named_parameters()}
    encoder = chosen(tiny_model(), 'encoder')
    assert encoder == {n for n in names if not n.startswith(('decoder', 'classifier')) and not n.endswith('pos_embed')}
    assert chosen(tiny_model(), 'all') - encoder == {n for n in names if n.startswith('decoder') and n != 'decoder_pos_embed'}
    assert encoder - chosen(tiny_model(), 'encoder_no_cls_no_msk') == {'cls_token', 'mask_token'}


def test_reached_norm_and_bias_take_what_the_objective_reaches():
    """The reconstruction loss reaches the encoder and the decoder, not the head; the entropy of the
    prediction reaches the encoder and the head, not the decoder."""
    encoder = chosen(tiny_model(), 'encoder')
    assert chosen(tiny_model(), 'reached') == chosen(tiny_model(), 'all')
    assert chosen(tiny_model(), 'reached', 'entropy') - encoder == \
        {n for n, _ in tiny_model().named_parameters() if n.startswith('classifier') and n != 'classifier_pos_embed'}
    def norms(*prefixes):
        return {n for n, _ in tiny_model().named_parameters() if n.startswith(prefixes) and 'norm' in n}
    assert chosen(tiny_model(), 'norm') == norms('blocks', 'norm', 'decoder')
    assert chosen(tiny_model(), 'norm', 'entropy') == norms('blocks', 'norm', 'classifier')
    biases = chosen(tiny_model(), 'bias')
    assert 'decoder_pred.bias' in biases and 'patch_embed.proj.bias' in biases
    assert not any(n.startswith('classifier') or not n.endswith('bias') for n in biases)
    assert 'classifier_pred.bias' in chosen(tiny_model(), 'bias', 'entropy')


def test_a_backbone_with_other_names_is_chosen_through_its_parts():
    load_plugin(f'{REPO}/tests/data/toy_backbone_plugin.py')
    toy = lambda: build_model('toy_backbone', num_classes=2)  # noqa: E731
    names = {n for n, _ in toy().named_parameters()}
    encoder = chosen(toy(), 'encoder')
    assert encoder == {n for n in names if n.startswith(('stem', 'encoder')) or n == 'mask_tok'}
    assert chosen(toy(), 'all') == encoder | {n for n in names if n.startswith('dec.')}
    assert encoder - chosen(toy(), 'encoder_no_cls_no_msk') == {'mask_tok'}
    assert chosen(toy(), 'norm') == {n for n in names if n.startswith(('encoder.layers', 'encoder.out_norm', 'dec.0'))
                                     and ('norm' in n or n.startswith('dec.0'))}
    assert chosen(toy(), 'last:1') == {n for n in names if n.startswith(('encoder.layers.2.', 'encoder.out_norm'))}
    assert chosen(toy(), 'lora:2') == {f'encoder.layers.{i}.attn.{m}.lora_{x}' for i in range(3)
                                      for m in ('qkv', 'proj') for x in 'AB'}
    groups = OnlineTrainer(toy(), online_args('--finetune_mode', 'all', '--encoder_lr_scale', '0.1'), 'cpu').param_groups()
    decoder_side = {n for n, p in toy().named_parameters() if n.startswith('dec.') or n == 'mask_tok'}
    assert [len(g['params']) for g in groups] == [len(chosen(toy(), 'all') - decoder_side), len(decoder_side)]


@pytest.mark.filterwarnings('ignore:Full backward hook is firing')  # block 1 has no input that requires grad
def test_last_k_adapts_the_last_blocks_and_the_backward_pass_stops_there(test_folder):
    model = tiny_model(norm_pix_loss=True)
    start = copy.deepcopy(model.state_dict())
    trainer = ttt.TestTimeTrainer(model, ttt_args('--finetune_mode', 'last:1', '--steps_per_example', '1'), 'cpu')
    grads = []
    model.blocks[0].register_full_backward_hook(lambda m, gi, go: grads.append('blocks.0'))
    model.blocks[1].register_full_backward_hook(lambda m, gi, go: grads.append('blocks.1'))
    adapt_all(trainer, items_of(test_folder, raw=False)[:1])
    moved = {n for n, v in model.state_dict().items() if not torch.equal(v, start[n])}
    assert moved == {n for n in start if n.startswith(('blocks.1.', 'norm.'))}
    assert grads == ['blocks.1']  # nothing below the adapted block runs backward


def test_lora_starts_as_the_model_and_resets_to_its_draw(test_folder):
    items = items_of(test_folder, raw=False)[:2]
    plain = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), ttt_args(), 'cpu'), items))
    model = tiny_model(norm_pix_loss=True)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    trainer = ttt.TestTimeTrainer(model, ttt_args('--finetune_mode', 'lora:2:4'), 'cpu')
    a = {n: p.detach().clone() for n, p in trainer.params.items() if n.endswith('lora_A')}
    assert len(a) == 4 and all(p.abs().sum() > 0 for p in a.values())
    assert all(not p.any() for n, p in trainer.params.items() if n.endswith('lora_B'))
    lora = stacked(adapt_all(trainer, items))
    # B = 0: the first classification and the first step's loss are the model's own, bit for bit
    assert np.array_equal(lora['ce_loss'][:, 0], plain['ce_loss'][:, 0])
    assert np.array_equal(lora['mae_loss'][:, 0], plain['mae_loss'][:, 0])
    assert not np.allclose(lora['mae_loss'][:, 1:], plain['mae_loss'][:, 1:], rtol=1e-6)
    assert all(torch.equal(v, base[n]) for n, v in model.state_dict().items() if n in base)  # only adapters move
    trainer.reset()
    assert all(torch.equal(trainer.params[n], v) for n, v in a.items())  # A's draw, B = 0 again
    assert all(not p.any() for n, p in trainer.params.items() if n.endswith('lora_B'))
    again = ttt.TestTimeTrainer(tiny_model(), ttt_args('--finetune_mode', 'lora:2:4'), 'cpu')
    assert all(torch.equal(again.params[n], v) for n, v in a.items())  # A from --seed, the same each time
    other = ttt.TestTimeTrainer(tiny_model(), ttt_args('--finetune_mode', 'lora:2:4', '--seed', '1'), 'cpu')
    assert not torch.equal(other.params['blocks.0.attn.qkv.lora_A'], a['blocks.0.attn.qkv.lora_A'])


def test_lora_scale_and_the_online_state_carries_the_adapters():
    model = tiny_model()
    choose_parameters(model, 'lora:2:8')
    linear = model.blocks[0].attn.qkv
    with torch.no_grad():
        linear.lora_B.normal_()
        x = torch.randn(3, 5, linear.in_features)
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias) + 4 * x @ linear.lora_A.T @ linear.lora_B.T
        torch.testing.assert_close(linear(x), expected)  # alpha / rank = 8 / 2
    trainer = OnlineTrainer(tiny_model(), online_args('--finetune_mode', 'lora:2'), 'cpu')
    assert {n for n in trainer.state()['weights']} == set(trainer.params) and \
        all(n.endswith(('lora_A', 'lora_B')) for n in trainer.params)


@pytest.mark.parametrize('rule', RULES)
def test_the_fast_trainer_runs_every_rule_as_the_default_one(test_folder, rule):
    args = ttt_args('--finetune_mode', rule, '--steps_per_example', '2')
    items = items_of(test_folder, raw=False)[:3]
    default = stacked(adapt_all(ttt.TestTimeTrainer(tiny_model(norm_pix_loss=True), args, 'cpu'), items))
    fast = stacked(adapt_all(FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=1), items))
    assert all(np.array_equal(fast[k], default[k]) for k in default), rule
    three = stacked(adapt_all(FastTrainer(tiny_model(norm_pix_loss=True), args, 'cpu', k=3), items))
    assert np.array_equal(three['pred'], default['pred'])
    np.testing.assert_allclose(three['mae_loss'], default['mae_loss'], rtol=1e-4)
