"""Fixed 2-D sin-cos position embeddings (as in MAE) and their resizing for checkpoints."""
import numpy as np
import torch


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: array of positions; returns (len(pos), embed_dim) = [sin(pos*w), cos(pos*w)]."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.)
    omega = 1. / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """(grid_size*grid_size [+1], embed_dim) table; half the channels per grid axis, row 0 zeros for cls."""
    assert embed_dim % 2 == 0
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # width first, as the released tables
    emb = np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0]),
                          get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def interpolate_pos_embed(model, checkpoint_model, key='pos_embed'):
    """Bicubically resize checkpoint_model[key] in place to the model's patch grid."""
    if key not in checkpoint_model or not hasattr(model, key):
        return
    pos_embed_checkpoint = checkpoint_model[key]
    embed_dim = pos_embed_checkpoint.shape[-1]
    num_patches = model.parts().num_patches
    num_extra_tokens = getattr(model, key).shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return
    print(f"Position interpolation of {key} from {orig_size}x{orig_size} to {new_size}x{new_size}")
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embed_dim).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(
        pos_tokens.float(), size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    checkpoint_model[key] = torch.cat((extra_tokens, pos_tokens.to(extra_tokens.dtype)), dim=1)
