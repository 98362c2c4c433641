"""Seeds derived from keys, so randomness depends on (seed, epoch, rank) or (seed, image), not on history."""
import random

import numpy as np
import torch


def derive_seed(*keys):
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
