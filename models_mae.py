"""Masked autoencoder ViT with a classification head (linear or ViT), as in TTT-MAE.

Parameter names are those of the released checkpoints (docs/method.md lists them); do not rename.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from util.errors import UserError
from util.pos_embed import get_2d_sincos_pos_embed

HEAD_TYPES = ('vit_head', 'linear', None)  # None: no head (pre-training writes the released MAE layout)


@dataclass
class Parts:
    """What the code around a model asks of it (docs/method.md, "Extending"): nothing
    outside a model names its parameters. Names are prefixes (str.startswith) of parameter and state-dict
    keys, so that they also sort the keys of a checkpoint; modules are the model's own."""
    image_size: int  # the side of the images it takes
    num_patches: int  # the length of a mask (a shuffle order of the patches)
    head: tuple = ()  # the classification head: loaded from the probe, never pre-trained, never adapted
    decoder: tuple = ()  # the reconstruction decoder: adapted by --finetune_mode all only
    decoder_side: tuple = ()  # all that only the reconstruction reads: left out of a probe, online's full-lr group
    tokens: tuple = ()  # learned tokens: frozen by --finetune_mode encoder_no_cls_no_msk
    fixed: tuple = ()  # fixed tables (sin-cos position embeddings): never adapted
    blocks: list = field(default_factory=list)  # the encoder's blocks, input to output (last:K)
    final_norm: Optional[nn.Module] = None  # the encoder's output normalisation (last:K)
    norms: list = field(default_factory=list)  # every normalisation layer (norm)
    attention: list = field(default_factory=list)  # the encoder blocks' attention projections, nn.Linear (lora:R)
    probe_keys: dict = field(default_factory=dict)  # head keys of another probe layout -> this model's


# MAE's linear-probe layout (head = Sequential(BatchNorm1d, Linear)) -> this model's names
LINEAR_PROBE_KEYS = {'head.0.running_mean': 'bn.running_mean', 'head.0.running_var': 'bn.running_var',
                     'head.0.num_batches_tracked': 'bn.num_batches_tracked',
                     'head.1.weight': 'head.weight', 'head.1.bias': 'head.bias'}


class MaskedAutoencoderViT(nn.Module):

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 classifier_embed_dim=768, classifier_depth=12, classifier_num_heads=12,
                 mlp_ratio=4., norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=1000,
                 head_type='vit_head', no_decoder=False, norm_pix_loss=False, drop_path_rate=0.):
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if head_type not in HEAD_TYPES:
            raise UserError(f"unknown head_type {head_type!r}; choices: vit_head, linear, None")
        self.head_type = head_type
        self.no_decoder = no_decoder
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        if not no_decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList([
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)])
            self.decoder_norm = norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        # classification head
        if head_type == 'vit_head':
            self.classifier_embed = nn.Linear(embed_dim, classifier_embed_dim, bias=True)
            self.classifier_pos_embed = nn.Parameter(
                torch.zeros(1, num_patches + 1, classifier_embed_dim), requires_grad=False)
            # on the CPU even under `with torch.device('meta')`, where .item() is impossible
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, classifier_depth, device='cpu')]
            self.classifier_blocks = nn.ModuleList([
                Block(classifier_embed_dim, classifier_num_heads, mlp_ratio, qkv_bias=True,
                      norm_layer=norm_layer, drop_path=dpr[i])
                for i in range(classifier_depth)])
            self.classifier_norm = norm_layer(classifier_embed_dim)
            self.classifier_pred = nn.Linear(classifier_embed_dim, num_classes, bias=True)
        elif head_type == 'linear':
            self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes)

        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches ** .5)
        for name in ('pos_embed', 'decoder_pos_embed', 'classifier_pos_embed'):
            table = getattr(self, name, None)
            if table is not None and table.device.type != 'meta':
                table.data.copy_(torch.from_numpy(
                    get_2d_sincos_pos_embed(table.shape[-1], grid, cls_token=True)).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # as a Linear on flattened patches
        torch.nn.init.normal_(self.cls_token, std=.02)
        if not self.no_decoder:
            torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def parts(self):
        """The released checkpoints' names: classifier* / head.* / bn.* the heads, decoder* and mask_token the
        reconstruction's, cls_token and mask_token the tokens, the three sin-cos tables fixed."""
        return Parts(image_size=self.patch_embed.img_size[0], num_patches=self.patch_embed.num_patches,
                     head=('classifier', 'head.', 'bn.'), decoder=('decoder',), decoder_side=('decoder', 'mask_token'),
                     tokens=('cls_token', 'mask_token'), fixed=('pos_embed', 'decoder_pos_embed', 'classifier_pos_embed'),
                     blocks=list(self.blocks), final_norm=self.norm,
                     norms=[m for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))],
                     attention=[linear for block in self.blocks for linear in (block.attn.qkv, block.attn.proj)],
                     probe_keys=LINEAR_PROBE_KEYS)

    def patchify(self, imgs):
        """(N, 3, H, W) -> (N, L, p*p*3), patches row-major, channels last inside a patch."""
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(imgs.shape[0], h * w, p * p * 3)

    def unpatchify(self, x):
        """(N, L, p*p*3) -> (N, 3, H, W)."""
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** .5)
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], 3, h * p, w * p)

    def random_masking(self, x, mask_ratio, input_mask=None):
        """Keep int(L*(1-mask_ratio)) tokens per sample: the lowest noise, or the first of input_mask.

        input_mask: shuffle orders (N, L), or one order (1, L) or (L,) for every sample; a tensor, a
        numpy array or a list, as the released model takes them.
        Returns kept tokens, mask (1 = removed, in original order) and ids_restore.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if input_mask is None:
            noise = torch.rand(N, L, device=x.device)
            ids_shuffle = torch.argsort(noise, dim=1)
        else:
            if not torch.is_tensor(input_mask):
                input_mask = torch.from_numpy(np.asarray(input_mask, dtype=np.int64))
            ids_shuffle = input_mask.to(x.device)
            if ids_shuffle.dim() == 1:
                ids_shuffle = ids_shuffle.unsqueeze(0)
            if ids_shuffle.shape[0] == 1 and N > 1:
                ids_shuffle = ids_shuffle.expand(N, -1)
            if tuple(ids_shuffle.shape) != (N, L):
                raise ValueError(f"input_mask has shape {tuple(input_mask.shape)}; expected ({N}, {L}), (1, {L}) "
                                 f"or ({L},)")
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, input_mask=None):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, input_mask)
        else:
            mask, ids_restore = None, None
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over removed patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward_head(self, latent):
        if self.head_type is None:
            raise ValueError("this model has no classification head (head_type=None)")
        if self.head_type == 'linear':
            return self.head(self.bn(latent[:, 0]))
        x = self.classifier_embed(latent) + self.classifier_pos_embed
        for blk in self.classifier_blocks:
            x = blk(x)
        return self.classifier_pred(self.classifier_norm(x)[:, 0])

    def forward(self, imgs, target=None, mask_ratio=0.75, input_mask=None, reconstruct=True):
        """Returns (loss dict, reconstruction pred or None, latent cls token, logits or None).

        The head runs when there is a target or no masking; the ViT head needs every token, so
        it requires mask_ratio == 0. Reconstruction runs only with masking and a decoder.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, input_mask)
        loss, pred, logits = {}, None, None
        if reconstruct and mask_ratio > 0:
            if self.no_decoder:
                raise ValueError("this model has no decoder (no_decoder=True): cannot reconstruct")
            pred = self.forward_decoder(latent, ids_restore)
            loss['mae'] = self.forward_loss(imgs, pred, mask)
        if target is not None or mask_ratio == 0:
            if self.head_type == 'vit_head' and mask_ratio > 0:
                raise ValueError("the ViT head classifies unmasked images only (mask_ratio must be 0)")
            logits = self.forward_head(latent)
            if target is not None:
                loss['classification'] = F.cross_entropy(logits, target)
        return loss, pred, latent[:, 0], logits

    # Named outputs of forward (the released signature above stays as it is), for call sites that want one.

    # The test-time objective (docs/method.md, "Extending"): the trainers minimise the sum of
    # every loss test_time_losses returns, each times its weight here (1 where absent), and record each by name.
    test_time_loss_weights = {}

    def test_time_losses(self, imgs, mask_ratio=0.75, input_mask=None):
        """{name: loss} of a batch of views of one image, view i masked by input_mask[i]: forward's loss dict,
        as the released engine summed it (here {'mae': ...})."""
        return self(imgs, mask_ratio=mask_ratio, input_mask=input_mask)[0]

    def logits(self, imgs):
        """The head's outputs for unmasked images."""
        return self(imgs, mask_ratio=0, reconstruct=False)[3]

    def reconstruct(self, imgs, mask_ratio, input_mask=None):
        """The decoder's predictions (N, L, p*p*3) of every patch, for the masks input_mask gives."""
        return self(imgs, mask_ratio=mask_ratio, input_mask=input_mask)[1]


# ---- registry of builders by name (used by --model) ----
MODELS = {}


def register_model(fn):
    MODELS[fn.__name__] = fn
    return fn


def _builder(name, **sizes):
    """Register a builder whose keyword arguments override the named sizes."""
    def build(**kwargs):
        return MaskedAutoencoderViT(**{**sizes, **kwargs})
    build.__name__ = name
    build.sizes = sizes  # for a subclass of the same size (docs/method.md, "Extending")
    return register_model(build)


_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)
_VIT_HEAD = dict(classifier_embed_dim=768, classifier_depth=12, classifier_num_heads=12)
mae_vit_small_patch16 = _builder('mae_vit_small_patch16', patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                 classifier_embed_dim=512, classifier_depth=8, classifier_num_heads=16, **_DECODER)
mae_vit_base_patch16 = _builder('mae_vit_base_patch16', patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                **_VIT_HEAD, **_DECODER)
mae_vit_large_patch16 = _builder('mae_vit_large_patch16', patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                 **_VIT_HEAD, **_DECODER)
mae_vit_huge_patch14 = _builder('mae_vit_huge_patch14', patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                **_VIT_HEAD, **_DECODER)
# CPU-sized models for small images (tests, the built-in digits example)
_TINY = dict(embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
             classifier_embed_dim=64, classifier_depth=1, classifier_num_heads=4, mlp_ratio=4)
mae_vit_tiny_patch4 = _builder('mae_vit_tiny_patch4', img_size=32, patch_size=4, **_TINY)
mae_vit_tiny_patch8 = _builder('mae_vit_tiny_patch8', img_size=64, patch_size=8, **_TINY)  # same 8x8 grid
mae_vit_micro_patch4 = _builder('mae_vit_micro_patch4', img_size=16, patch_size=4, embed_dim=32, depth=2,
                                num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                classifier_embed_dim=16, classifier_depth=1, classifier_num_heads=2, mlp_ratio=2)


def build_model(name, **kwargs):
    """Build a registered model; keyword arguments set to None keep the builder's default
    (head_type=None is kept: no head)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choices: {', '.join(sorted(MODELS))}")
    return MODELS[name](**{k: v for k, v in kwargs.items() if v is not None or k == 'head_type'})
