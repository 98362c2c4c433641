"""Seeds derived from keys, so randomness depends on (seed, epoch, rank) or (seed, image), not on history."""
import enum
import random

import numpy as np
import torch


@enum.unique  # two streams with one value would draw the same numbers: refused when this module loads
class Stream(enum.IntEnum):
    """The random streams of a test-time run, each a key after the run's --seed: derive_seed(seed, image,
    Stream.MASKS) gives an image's masks wherever and whenever it is adapted. The values are recorded in
    every result drawn from them: a stream keeps its value, a new one takes the next."""
    MASKS = 1  # (seed, image, MASKS): the masks of every step, micro-batch and view
    CROPS = 2  # (seed, image, CROPS): the random resized crops of its views
    STREAM_ORDER = 3  # (seed, STREAM_ORDER): the order of an online stream ('shuffled')
    RESTORE = 4  # (seed, image, RESTORE, step): online stochastic restore
    FIGURE_MASKS = 5  # (seed, image, FIGURE_MASKS): the one mask of its reconstruction figure
    LORA = 6  # (seed, LORA): the low-rank adapters' A of --finetune_mode lora, the same for every image


def derive_seed(*keys):
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
