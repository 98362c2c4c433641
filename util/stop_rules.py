"""Stopping rules: after how many steps an image's adaptation stops, decided from label-free signals only.

A rule is asked after each classification, at step t = 0 (before the first step) to the last, what it
knows: the predictions and top-1 probabilities of steps 0..t and the objective of steps 1..t (the weighted
sum of the losses a step minimised: TTT-MAE's reconstruction loss). The first step at which it fires is where the image stops (the last step if it never fires), so
the same function scores a rule on a finished run (scripts/score_stop_rules.py) and applies it live
(main_test_time_training.py --stop_rule), with the same answer. The labels are never read.
"""
import math

from util.errors import UserError

# name: (parameter type, what it means, its valid range as (low, high, low_open, high_open))
RULES = {
    'fixed': (int, 'stop after K steps', (0, math.inf, False, True)),
    'stable': (int, 'stop once the prediction has not changed for M steps', (1, math.inf, False, True)),
    'plateau': (float, 'stop once the objective fell by less than a fraction X over the last step',
                (0, 1, False, True)),
    'confident': (float, 'stop once the top-1 probability exceeds P', (0, 1, True, True)),
}


def parse(text):
    """'name:param' -> (name, param), or one clear line naming what is wrong."""
    name, _, value = text.partition(':')
    if name not in RULES:
        raise UserError(f"unknown stopping rule {name!r}; choices: {', '.join(f'{n}:{RULES[n][0].__name__.upper()}' for n in RULES)}")
    kind, meaning, (low, high, low_open, high_open) = RULES[name]
    try:
        param = kind(value)
    except ValueError:
        raise UserError(f"stopping rule {text!r}: {name} takes a{'n integer' if kind is int else ' number'} "
                        f"({name}:{kind.__name__.upper()}, {meaning})") from None
    if (param < low or (low_open and param == low)) or (param > high or (high_open and param == high)) \
            or not math.isfinite(param):
        bounds = f"{'>' if low_open else '>='} {low}" + ('' if high == math.inf else f" and {'<' if high_open else '<='} {high}")
        raise UserError(f"stopping rule {text!r}: the parameter must be {bounds}")
    return name, param


def fires(name, param, t, preds, probs, losses):
    """Whether the rule stops the image at step t, from preds[0..t], probs[0..t] and losses[0..t-1]."""
    if name == 'fixed':
        return t >= param
    if name == 'stable':
        return t >= param and all(preds[t - i] == preds[t] for i in range(1, param + 1))
    if name == 'plateau':
        return t >= 2 and losses[t - 2] - losses[t - 1] < param * losses[t - 2]
    return probs[t] > param  # confident


def stop_step(name, param, preds, probs, losses):
    """The step at which a finished run's image would have stopped (its last step if never)."""
    last = len(preds) - 1
    return next((t for t in range(last + 1) if fires(name, param, t, preds, probs, losses)), last)
