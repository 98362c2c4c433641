"""models_mae.py and util/pos_embed.py: parameter names, sin-cos tables, patches, masking, loss, init."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model
from models_mae import MODELS, MaskedAutoencoderViT, build_model
from util.errors import UserError
from util.pos_embed import get_2d_sincos_pos_embed

BLOCK_SUFFIXES = {  # timm Block layout, as in the released checkpoints: suffix -> shape for width D
    'norm1.weight': lambda d: (d,), 'norm1.bias': lambda d: (d,),
    'attn.qkv.weight': lambda d: (3 * d, d), 'attn.qkv.bias': lambda d: (3 * d,),
    'attn.proj.weight': lambda d: (d, d), 'attn.proj.bias': lambda d: (d,),
    'norm2.weight': lambda d: (d,), 'norm2.bias': lambda d: (d,),
    'mlp.fc1.weight': lambda d: (4 * d, d), 'mlp.fc1.bias': lambda d: (4 * d,),
    'mlp.fc2.weight': lambda d: (d, 4 * d), 'mlp.fc2.bias': lambda d: (d,),
}


def blocks(prefix, depth, d):
    return {f'{prefix}.{i}.{s}': shape(d) for i in range(depth) for s, shape in BLOCK_SUFFIXES.items()}


# mae_pretrain_vit_large_full.pth (the released MAE checkpoint)
RELEASED_MAE = {
    'cls_token': (1, 1, 1024), 'pos_embed': (1, 197, 1024),
    'patch_embed.proj.weight': (1024, 3, 16, 16), 'patch_embed.proj.bias': (1024,),
    **blocks('blocks', 24, 1024),
    'norm.weight': (1024,), 'norm.bias': (1024,),
    'mask_token': (1, 1, 512),
    'decoder_embed.weight': (512, 1024), 'decoder_embed.bias': (512,),
    'decoder_pos_embed': (1, 197, 512),
    **blocks('decoder_blocks', 8, 512),
    'decoder_norm.weight': (512,), 'decoder_norm.bias': (512,),
    'decoder_pred.weight': (768, 512), 'decoder_pred.bias': (768,),
}
# the classifier part of prob_lr1e-3_wd.2_blk12_ep20.pth (the released probe checkpoint)
RELEASED_VIT_HEAD = {
    'classifier_embed.weight': (768, 1024), 'classifier_embed.bias': (768,),
    'classifier_pos_embed': (1, 197, 768),
    **blocks('classifier_blocks', 12, 768),
    'classifier_norm.weight': (768,), 'classifier_norm.bias': (768,),
    'classifier_pred.weight': (1000, 768), 'classifier_pred.bias': (1000,),
}
LINEAR_HEAD = {'bn.running_mean': (1024,), 'bn.running_var': (1024,), 'bn.num_batches_tracked': (),
               'head.weight': (1000, 1024), 'head.bias': (1000,)}


def meta_model(name='mae_vit_large_patch16', **kwargs):
    with torch.device('meta'):
        return build_model(name, **kwargs)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- names and sizes ----

def test_large_vit_head_has_the_released_names_and_shapes():
    model = meta_model(head_type='vit_head', classifier_depth=12)
    got, expected = shapes(model), {**RELEASED_MAE, **RELEASED_VIT_HEAD}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    assert len(expected) == 4 + 24 * 12 + 2 + 4 + 8 * 12 + 4 + 3 + 12 * 12 + 4 == 549


def test_large_linear_head_names():
    got = shapes(meta_model(head_type='linear'))
    assert got == {**RELEASED_MAE, **LINEAR_HEAD}
    assert not any(k.startswith('classifier') for k in got)


def test_linear_head_is_batchnorm_without_affine():
    model = tiny_model(head_type='linear')
    assert isinstance(model.bn, torch.nn.BatchNorm1d)
    assert model.bn.affine is False and model.bn.eps == 1e-6


def test_no_head_is_the_released_mae_checkpoint_layout():
    """What pre-training builds and saves: encoder, decoder and mask_token, as mae_pretrain_vit_large_full.pth."""
    model = meta_model(head_type=None)
    assert shapes(model) == RELEASED_MAE
    with pytest.raises(ValueError, match='no classification head'):
        tiny_model(head_type=None)(torch.zeros(1, 3, 16, 16), mask_ratio=0)


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(UserError, match='image size 30 is not a multiple of the patch size 4'):
        build_model(TINY, img_size=30)


def test_no_decoder_drops_decoder_and_mask_token():
    got = shapes(meta_model(head_type='vit_head', no_decoder=True))
    assert got == {**{k: v for k, v in RELEASED_MAE.items() if not k.startswith(('decoder', 'mask_token'))},
                   **RELEASED_VIT_HEAD}


@pytest.mark.parametrize('name, patch, dim, depth, heads, head_dim, head_depth, head_heads', [
    ('mae_vit_small_patch16', 16, 384, 12, 12, 512, 8, 16),
    ('mae_vit_base_patch16', 16, 768, 12, 12, 768, 12, 12),
    ('mae_vit_large_patch16', 16, 1024, 24, 16, 768, 12, 12),
    ('mae_vit_huge_patch14', 14, 1280, 32, 16, 768, 12, 12),
])
def test_builder_sizes(name, patch, dim, depth, heads, head_dim, head_depth, head_heads):
    m = meta_model(name)
    assert m.patch_embed.patch_size == (patch, patch) and m.patch_embed.img_size == (224, 224)
    assert m.pos_embed.shape == (1, (224 // patch) ** 2 + 1, dim)
    assert len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.blocks[0].mlp.fc1.out_features == 4 * dim and m.norm.eps == 1e-6
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16 and m.decoder_blocks[0].mlp.fc1.out_features == 2048
    assert m.decoder_pred.out_features == patch * patch * 3
    assert m.classifier_embed.out_features == head_dim and len(m.classifier_blocks) == head_depth
    assert m.classifier_blocks[0].attn.num_heads == head_heads
    assert len(meta_model(name, classifier_depth=3).classifier_blocks) == 3


def test_tiny_builders_differ_only_in_image_and_patch_size():
    small, large = meta_model('mae_vit_tiny_patch4'), meta_model('mae_vit_tiny_patch8')
    assert (small.patch_embed.img_size, small.patch_embed.patch_size) == ((32, 32), (4, 4))
    assert (large.patch_embed.img_size, large.patch_embed.patch_size) == ((64, 64), (8, 8))
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    differ = {k for k, v in large.state_dict().items() if v.shape != shapes.pop(k)}
    assert not shapes and differ == {'patch_embed.proj.weight', 'decoder_pred.weight', 'decoder_pred.bias'}


def test_unknown_model_lists_the_choices():
    with pytest.raises(UserError) as e:
        build_model('mae_vit_gigantic_patch99')
    msg = str(e.value)
    assert 'mae_vit_gigantic_patch99' in msg
    for name in ('mae_vit_base_patch16', 'mae_vit_large_patch16', 'mae_vit_huge_patch14', TINY):
        assert name in msg and name in MODELS


def test_head_drop_path_is_linearly_spaced():
    m = tiny_model(classifier_depth=3, drop_path_rate=0.2)
    probs = [getattr(b.drop_path1, 'drop_prob', 0.) for b in m.classifier_blocks]
    assert probs == pytest.approx([0., 0.1, 0.2])


# ---- sin-cos tables ----

def sincos_1d(pos, k, quarter):
    w = 1. / 10000 ** (k / quarter)
    return math.sin(pos * w), math.cos(pos * w)


@pytest.mark.parametrize('dim, grid', [(16, 4), (8, 3)])
def test_2d_sincos_table_matches_the_formula(dim, grid):
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (grid * grid + 1, dim)
    assert np.all(table[0] == 0)
    q = dim // 4
    for row in range(grid):
        for col in range(grid):
            t = 1 + row * grid + col  # token order of the patch embedding: row-major
            for k in range(q):
                # first half: grid[0] of meshgrid(w, h), i.e. the column (width) coordinate
                assert (table[t, k], table[t, q + k]) == pytest.approx(sincos_1d(col, k, q), abs=1e-12)
                assert (table[t, 2 * q + k], table[t, 3 * q + k]) == pytest.approx(sincos_1d(row, k, q), abs=1e-12)
    no_cls = get_2d_sincos_pos_embed(dim, grid, cls_token=False)
    assert np.array_equal(no_cls, table[1:])


def test_2d_sincos_first_half_varies_along_width():
    table = get_2d_sincos_pos_embed(8, 4)
    # moving one column right changes only the first half, one row down only the second
    assert np.array_equal(table[0, 4:], table[1, 4:]) and not np.array_equal(table[0, :4], table[1, :4])
    assert np.array_equal(table[0, :4], table[4, :4]) and not np.array_equal(table[0, 4:], table[4, 4:])


def test_model_tables_are_fixed_sincos():
    m = tiny_model()
    grid = 16 // 4
    for name in ('pos_embed', 'decoder_pos_embed', 'classifier_pos_embed'):
        p = getattr(m, name)
        expected = torch.from_numpy(get_2d_sincos_pos_embed(p.shape[-1], grid, cls_token=True)).float()
        assert torch.equal(p.data[0], expected), name
        assert p.requires_grad is False, name
        assert name in dict(m.named_parameters()) and name in m.state_dict()


# ---- patches ----

def test_patchify_unpatchify_round_trip():
    m = tiny_model()
    imgs = torch.randn(2, 3, 16, 16)
    x = m.patchify(imgs)
    assert x.shape == (2, 16, 4 * 4 * 3)
    assert torch.equal(m.unpatchify(x), imgs)


def test_patch_order_is_row_major_channels_last():
    m = tiny_model()
    n, c, y, x = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(16), torch.arange(16), indexing='ij')
    imgs = (n * 100000 + c * 10000 + y * 100 + x).float()  # each pixel encodes where it is
    patches = m.patchify(imgs)
    p, w = 4, 4  # patch size, patches per row

    def value(n, c, y, x):
        return n * 100000 + c * 10000 + y * 100 + x

    for (nn_, cc, yy, xx) in [(0, 0, 0, 0), (0, 2, 0, 1), (1, 1, 5, 2), (0, 0, 3, 13), (1, 2, 15, 15), (0, 1, 9, 6)]:
        patch = (yy // p) * w + xx // p
        inside = ((yy % p) * p + xx % p) * 3 + cc
        assert patches[nn_, patch, inside].item() == value(nn_, cc, yy, xx)
    # the second patch is to the right of the first, the fifth starts the second patch row
    assert patches[0, 1, 0].item() == value(0, 0, 0, 4)
    assert patches[0, 4, 0].item() == value(0, 0, 4, 0)
    assert patches[0, 0, :3].tolist() == [value(0, 0, 0, 0), value(0, 1, 0, 0), value(0, 2, 0, 0)]


def test_patch_embed_tokens_follow_the_patch_order():
    """Token t of the encoder is patch t of patchify: a change in patch 6 moves token 6 only."""
    m = tiny_model()
    imgs = torch.zeros(1, 3, 16, 16)
    moved = imgs.clone()
    moved[0, :, 4:8, 8:12] = 1.  # patch row 1, column 2: index 6
    assert m.patchify(moved)[0].abs().sum(-1).nonzero().flatten().tolist() == [6]
    with torch.no_grad():
        diff = (m.patch_embed(moved) - m.patch_embed(imgs)).abs().sum(-1)[0]
    assert diff.nonzero().flatten().tolist() == [6]


# ---- masking ----

@pytest.mark.parametrize('ratio', [0.75, 0.5, 0.3])
def test_random_masking_counts(ratio):
    m = tiny_model()
    x = torch.randn(3, 16, 32)
    kept, mask, ids_restore = m.random_masking(x, ratio)
    len_keep = int(16 * (1 - ratio))
    assert kept.shape == (3, len_keep, 32)
    assert mask.shape == (3, 16) and torch.equal(mask.sum(1), torch.full((3,), 16. - len_keep))
    assert set(mask.unique().tolist()) <= {0., 1.}
    # the kept tokens are exactly the unmasked ones, in shuffle order
    for i in range(3):
        kept_rows = {tuple(r.tolist()) for r in kept[i]}
        assert kept_rows == {tuple(x[i, j].tolist()) for j in range(16) if mask[i, j] == 0}
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(3, -1))


def test_input_mask_decides_which_patches_are_removed():
    m = tiny_model()
    x = torch.randn(2, 16, 32)
    gen = torch.Generator().manual_seed(1)
    ids_shuffle = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    kept, mask, ids_restore = m.random_masking(x, 0.75, input_mask=ids_shuffle)
    for i in range(2):
        expected = torch.zeros(16)
        expected[ids_shuffle[i, 4:]] = 1
        assert torch.equal(mask[i], expected)
        assert torch.equal(kept[i], x[i, ids_shuffle[i, :4]])
        assert torch.equal(ids_restore[i], torch.argsort(ids_shuffle[i]))


def test_input_mask_as_tensor_array_or_list_and_one_row_for_the_batch():
    """As the released model: a tensor, a numpy array or a list; one order is used for every sample."""
    m = tiny_model()
    x = torch.randn(3, 16, 32)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    expected = m.random_masking(x, 0.75, input_mask=order.expand(3, -1))
    for given in (order, order[None], order.numpy(), order.tolist(), [order.tolist()], order.expand(3, -1).numpy()):
        got = m.random_masking(x, 0.75, input_mask=given)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), type(given)
    with pytest.raises(ValueError, match=r'expected \(3, 16\), \(1, 16\) or \(16,\)'):
        m.random_masking(x, 0.75, input_mask=order[:8])


def test_same_input_mask_same_loss():
    m = tiny_model()
    imgs = torch.randn(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    b = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    with torch.no_grad():
        torch.manual_seed(1)
        la = m(imgs, input_mask=a)[0]['mae']
        torch.manual_seed(2)  # the global RNG must not matter
        la2 = m(imgs, input_mask=a.clone())[0]['mae']
        lb = m(imgs, input_mask=b)[0]['mae']
        random1 = m(imgs)[0]['mae']
        random2 = m(imgs)[0]['mae']
    assert torch.equal(la, la2)
    assert not torch.equal(la, lb)
    assert not torch.equal(random1, random2)


def test_no_masking_gives_logits_and_no_reconstruction():
    m = tiny_model(num_classes=5)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        loss, pred, cls, logits = m(imgs, mask_ratio=0)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0)
    assert loss == {} and pred is None
    assert logits.shape == (3, 5) and cls.shape == (3, 32)
    assert latent.shape == (3, 17, 32) and mask is None and ids_restore is None
    target = torch.tensor([0, 4, 2])
    with torch.no_grad():
        loss, _, _, logits = m(imgs, target=target, mask_ratio=0)
    assert set(loss) == {'classification'}
    assert torch.allclose(loss['classification'], F.cross_entropy(logits, target))


def test_masked_forward_shapes():
    m = tiny_model(head_type='linear')
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        loss, pred, cls, logits = m(imgs)
    assert set(loss) == {'mae'} and pred.shape == (2, 16, 48) and logits is None
    with pytest.raises(ValueError):
        tiny_model()(imgs, target=torch.tensor([0, 1]), mask_ratio=0.75)  # the ViT head needs every token


# ---- loss ----

def test_loss_counts_removed_patches_only():
    m = tiny_model()
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5, 6]] = 1
    mask[1, [0, 2, 3, 15]] = 1
    loss = m.forward_loss(imgs, pred, mask)
    target = m.patchify(imgs)
    per_patch = [((pred[i, j] - target[i, j]) ** 2).mean() for i in range(2) for j in range(16) if mask[i, j]]
    assert torch.allclose(loss, torch.stack(per_patch).mean(), atol=0, rtol=1e-6)
    changed = pred.clone()
    changed[mask == 0] += 100.  # predictions of kept patches do not count
    assert torch.equal(m.forward_loss(imgs, changed, mask), loss)
    changed = pred.clone()
    changed[0, 5] += 1.
    assert not torch.equal(m.forward_loss(imgs, changed, mask), loss)


def test_norm_pix_loss_formula():
    m = tiny_model(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    pred = torch.randn(2, 16, 48, dtype=torch.float64)
    mask = (torch.arange(16) % 3 == 0).double().expand(2, -1)
    loss = m.forward_loss(imgs, pred, mask)
    t = m.patchify(imgs).numpy()
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.numpy() - t) ** 2).mean(-1)
    expected = per_patch[:, ::3].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # the biased variance would give a different value
    tb = m.patchify(imgs).numpy()
    tb = (tb - tb.mean(-1, keepdims=True)) / np.sqrt(tb.var(-1, keepdims=True) + 1e-6)
    assert loss.item() != pytest.approx(((pred.numpy() - tb) ** 2).mean(-1)[:, ::3].mean(), rel=1e-6)


# ---- attention ----

def reference_block(blk, x):
    """timm's pre-norm Block computed by hand with an explicit softmax."""
    a = blk.attn
    B, N, C = x.shape
    h = blk.norm1(x)
    qkv = (h @ a.qkv.weight.T + a.qkv.bias).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // a.num_heads), dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + h @ a.proj.weight.T + a.proj.bias
    h = blk.norm2(x)
    h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def test_fused_attention_equals_explicit_softmax():
    m = tiny_model()
    blocks_ = list(m.blocks) + list(m.decoder_blocks) + list(m.classifier_blocks)
    assert all(b.attn.fused_attn for b in blocks_), 'expected the fused scaled_dot_product_attention path'
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert torch.allclose(m.blocks[0](x), reference_block(m.blocks[0], x), atol=1e-5, rtol=0)
        imgs = torch.randn(2, 3, 16, 16)
        ids = torch.stack([torch.randperm(16) for _ in range(2)])
        fused = m(imgs, input_mask=ids)
        fused_logits = m(imgs, mask_ratio=0)[3]
        for b in blocks_:
            b.attn.fused_attn = False
        explicit = m(imgs, input_mask=ids)
        explicit_logits = m(imgs, mask_ratio=0)[3]
    assert torch.allclose(fused[1], explicit[1], atol=1e-5, rtol=0)
    assert torch.allclose(fused[0]['mae'], explicit[0]['mae'], atol=1e-5, rtol=0)
    assert torch.allclose(fused_logits, explicit_logits, atol=1e-5, rtol=0)


# ---- initialisation ----

def test_init_layernorm_linear_and_tokens():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=1024, depth=1, num_heads=16,
                             decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16,
                             classifier_embed_dim=64, classifier_depth=1, classifier_num_heads=4)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.bias == 0), name
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))  # xavier-uniform
            assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.9 * bound, name
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.mask_token.std().item() == pytest.approx(0.02, rel=0.15)
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # xavier on the (out, in*p*p) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
