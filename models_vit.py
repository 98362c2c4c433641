"""MAE's end-to-end fine-tuned ViT (MAE's models_vit.VisionTransformer with global average pooling), for the
paper's Fine-Tune row: `mae_finetuned_vit_{base,large,huge}.pth`, released by the MAE authors, evaluated
without adaptation (test_without_adaptation.py). It has no decoder, so it takes no test-time training.

Parameter names are those of the released files (under 'model'): patch_embed.proj.*, cls_token, pos_embed
(learned, fine-tuned from the sin-cos table), blocks.{i}.* (timm's Block), fc_norm.* (after the average of
the patch tokens) and head.*; no norm.*.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from models_mae import Parts, register_model


class VisionTransformer(nn.Module):
    takes_test_time_training = False  # no decoder: the baseline only

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 mlp_ratio=4., num_classes=1000, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.fc_norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def parts(self):
        """The released files' names: head.* the classifier (fc_norm before it, a part of the encoder's output)."""
        return Parts(image_size=self.patch_embed.img_size[0], num_patches=self.patch_embed.num_patches, head=('head.',),
                     blocks=list(self.blocks), final_norm=self.fc_norm,
                     norms=[m for m in self.modules() if isinstance(m, nn.LayerNorm)],
                     attention=[linear for block in self.blocks for linear in (block.attn.qkv, block.attn.proj)])

    def logits(self, imgs):
        """The class scores of unmasked images: the patch tokens averaged (global pool), normed, classified."""
        x = self.patch_embed(imgs)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))


def _builder(name, **sizes):
    def build(num_classes=1000, img_size=None, **mae_options):
        # the test-time scripts pass the MAE model's options too (norm_pix_loss, the head's): none applies here
        return VisionTransformer(num_classes=num_classes, **{**sizes, **({'img_size': img_size} if img_size else {})})
    build.__name__ = name
    return register_model(build)


vit_base_patch16 = _builder('vit_base_patch16', patch_size=16, embed_dim=768, depth=12, num_heads=12)
vit_large_patch16 = _builder('vit_large_patch16', patch_size=16, embed_dim=1024, depth=24, num_heads=16)
vit_huge_patch14 = _builder('vit_huge_patch14', patch_size=14, embed_dim=1280, depth=32, num_heads=16)
vit_micro_patch4 = _builder('vit_micro_patch4', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)  # tests
