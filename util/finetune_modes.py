"""--finetune_mode: the rules for which parameters adapt at test time, by name, each a function of the model's
own description of itself (its parts(), models_mae.Parts). A plugin registers its own with
register_finetune_mode (docs/method.md). Every parameter a rule does not choose is frozen."""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from util.errors import UserError
from util.seed import Stream, derive_seed


@dataclass
class FinetuneMode:
    choose: Callable  # (model, parts, param, seed) -> names of the parameters that adapt (lora: adds them first)
    help: str
    parse: Optional[Callable] = None  # the text after NAME: -> param (raise ValueError saying why); None: takes none
    reached_only: bool = False  # of those, only the ones the objective's gradient reaches


FINETUNE_MODES = {}


def register_finetune_mode(name, help, parse=None, reached_only=False):
    """Register choose(model, parts, param, seed) -> parameter names under `name` (NAME or NAME:PARAM)."""
    def register(choose):
        FINETUNE_MODES[name] = FinetuneMode(choose, help, parse, reached_only)
        return choose
    return register


def parse_finetune_mode(text):
    """'name' or 'name:param' -> (name, param), or a UserError naming what is wrong."""
    name, colon, rest = text.partition(':')
    if name not in FINETUNE_MODES:
        raise UserError(f"unknown --finetune_mode {name!r}; choices: " + ', '.join(
            n + (':...' if m.parse else '') for n, m in FINETUNE_MODES.items()))
    mode = FINETUNE_MODES[name]
    if mode.parse is None:
        if colon:
            raise UserError(f"--finetune_mode {name} takes no parameter (got {text!r})")
        return name, None
    try:
        return name, mode.parse(rest)
    except ValueError as e:
        raise UserError(f"--finetune_mode {text}: {e}") from None


def module_parameters(model, modules):
    """The names of the modules' own parameters."""
    ids = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def choose_parameters(model, finetune_mode, seed=0, reached=None):
    """{name: parameter} the mode adapts, in the model's order, requires_grad set on them and cleared on the
    rest. reached() -> names the objective's gradient reaches, asked only by modes that keep those alone."""
    name, param = parse_finetune_mode(finetune_mode)
    mode = FINETUNE_MODES[name]
    chosen = set(mode.choose(model, model.parts(), param, seed))
    if mode.reached_only:
        chosen &= reached()
    params = {}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
        if n in chosen:
            params[n] = p
    if not params:
        raise UserError(f"--finetune_mode {finetune_mode} chooses no parameter of --model that the objective's "
                        f"gradient reaches")
    return params


def adaptable(model, parts):
    """Every parameter but the head's (no gradient from the reconstruction: frozen outright, the same result
    with less memory) and the fixed tables."""
    return [n for n, _ in model.named_parameters() if not n.startswith(parts.head + parts.fixed)]


@register_finetune_mode('encoder', 'everything but the head, the fixed tables and the decoder (the paper)')
def encoder(model, parts, param, seed):
    return [n for n in adaptable(model, parts) if not n.startswith(parts.decoder)]


@register_finetune_mode('all', 'the decoder too')
def everything(model, parts, param, seed):
    return adaptable(model, parts)


@register_finetune_mode('encoder_no_cls_no_msk', 'encoder without the learned tokens (cls_token, mask_token)')
def encoder_no_tokens(model, parts, param, seed):
    return [n for n in encoder(model, parts, param, seed) if not n.startswith(parts.tokens)]


@register_finetune_mode('reached', "every parameter the objective's gradient reaches but the fixed tables (MEMO's "
                                   "'all parameters': under a classification objective the encoder and the head)",
                        reached_only=True)
def reached(model, parts, param, seed):
    return [n for n, _ in model.named_parameters() if not n.startswith(parts.fixed)]


@register_finetune_mode('norm', "the normalisation layers' weights and biases the objective's gradient reaches (TENT: "
                                "the head's too, under an objective that reads it)", reached_only=True)
def norm(model, parts, param, seed):
    return module_parameters(model, parts.norms)


@register_finetune_mode('bias', "every bias the objective's gradient reaches", reached_only=True)
def bias(model, parts, param, seed):
    return [n for n, _ in model.named_parameters() if n.split('.')[-1] == 'bias' and not n.startswith(parts.fixed)]


def block_count(text):
    count = int(text)  # ValueError: not a number
    if count < 1:
        raise ValueError(f"K must be 1 or more, got {count}")
    return count


@register_finetune_mode('last', "last:K, the encoder's last K blocks and its final norm (backward stops there)",
                        parse=block_count)
def last_blocks(model, parts, k, seed):
    if k > len(parts.blocks):
        raise UserError(f"--finetune_mode last:{k}: the encoder has {len(parts.blocks)} blocks")
    return module_parameters(model, parts.blocks[-k:] + ([parts.final_norm] if parts.final_norm else []))


def lora_rank(text):
    rank, _, alpha = text.partition(':')
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"the rank R must be 1 or more, got {rank}")
    alpha = float(alpha) if alpha else float(rank)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"ALPHA must be a positive number, got {alpha}")
    return rank, alpha


def add_lora(linear, rank, alpha, generator):
    """Adapters on an nn.Linear: out + alpha/rank * B A x, with A (rank, in) as nn.Linear draws its weight (from
    `generator`) and B (out, rank) zero, so that the model computes what it did until B moves."""
    if hasattr(linear, 'lora_A'):
        raise UserError("this model has low-rank adapters already (--finetune_mode lora applied twice)")
    a = torch.empty(rank, linear.in_features)  # drawn on the CPU: the same adapters on any device
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    like = linear.weight
    linear.register_parameter('lora_A', torch.nn.Parameter(a.to(like.device, like.dtype)))
    linear.register_parameter('lora_B', torch.nn.Parameter(torch.zeros(linear.out_features, rank, device=like.device,
                                                                       dtype=like.dtype)))
    scale = alpha / rank
    linear.register_forward_hook(lambda m, inputs, out: out + scale * F.linear(F.linear(inputs[0], m.lora_A), m.lora_B))


@register_finetune_mode('lora', "lora:R[:ALPHA], low-rank adapters on each encoder block's attention projections "
                                "(LoRA; scale ALPHA/R, ALPHA = R unless given)", parse=lora_rank)
def lora(model, parts, rank_alpha, seed):
    rank, alpha = rank_alpha
    generator = torch.Generator().manual_seed(derive_seed(seed, Stream.LORA))
    for linear in parts.attention:
        add_lora(linear, rank, alpha, generator)
    return [n for n, _ in model.named_parameters() if n.endswith(('.lora_A', '.lora_B'))]
