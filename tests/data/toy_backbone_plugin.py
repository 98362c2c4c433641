"""A researcher's backbone as a plugin file (tests/test_plugins.py copies it outside the repository): a masked
autoencoder whose names differ from the MAE ViT's (stem, encoder.layers.N, encoder.out_norm, dec, mask_tok,
cls_head), whose reconstruction loss is called 'recon', and which describes itself through parts()."""
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from models_mae import Parts, register_model


class ToyBackbone(nn.Module):
    test_time_loss_weights = {}

    def __init__(self, img_size=16, patch=4, dim=32, depth=3, num_classes=2):
        super().__init__()
        self.stem = PatchEmbed(img_size, patch, 3, dim)
        self.pos = nn.Parameter(torch.randn(1, self.stem.num_patches, dim) * .02, requires_grad=False)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(dim, 2, 2., qkv_bias=True) for _ in range(depth)])
        self.encoder.out_norm = nn.LayerNorm(dim)
        self.mask_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.dec = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, patch * patch * 3))
        self.cls_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def parts(self):
        return Parts(image_size=self.stem.img_size[0], num_patches=self.stem.num_patches, head=('cls_head.',),
                     decoder=('dec.',), decoder_side=('dec.', 'mask_tok'), tokens=('mask_tok',), fixed=('pos',),
                     blocks=list(self.encoder.layers), final_norm=self.encoder.out_norm,
                     norms=[m for m in self.modules() if isinstance(m, nn.LayerNorm)],
                     attention=[m for block in self.encoder.layers for m in (block.attn.qkv, block.attn.proj)])

    def encode(self, imgs, keep=None):
        x = self.stem(imgs) + self.pos
        if keep is not None:  # the kept patches of each image, in the order given
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.encoder.out_norm(x)

    def reconstruct(self, imgs, mask_ratio, input_mask):
        """Every patch's predicted pixels: the encoded kept patches where kept, the mask token elsewhere."""
        order = input_mask.expand(imgs.shape[0], -1)
        keep = int(order.shape[1] * (1 - mask_ratio))
        tokens = self.mask_tok.expand(imgs.shape[0], order.shape[1], -1).clone()
        tokens.scatter_(1, order[:, :keep, None].expand(-1, -1, tokens.shape[-1]), self.encode(imgs, order[:, :keep]))
        return self.dec(tokens + self.pos)

    def test_time_losses(self, imgs, mask_ratio=0.75, input_mask=None):
        order = input_mask.expand(imgs.shape[0], -1)
        p = self.stem.patch_size[0]
        target = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(imgs.shape[0], -1, p * p * 3)
        removed = torch.ones_like(order, dtype=imgs.dtype).scatter(1, order[:, :int(order.shape[1] * (1 - mask_ratio))], 0)
        error = (self.reconstruct(imgs, mask_ratio, order) - target).square().mean(-1)
        return {'recon': (error * removed).sum() / removed.sum()}

    def logits(self, imgs):
        return self.cls_head(self.encode(imgs).mean(dim=1))


@register_model
def toy_backbone(num_classes=2, img_size=None, **options):  # the scripts' other model options do not apply
    return ToyBackbone(img_size=img_size or 16, num_classes=num_classes)
