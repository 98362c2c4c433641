"""Which of a sweep's extra flags each script takes: writes them NUL-separated (for `mapfile -d ''`)
to one file per script.

  scripts/split_sweep_flags.py BASELINE_FILE TTT_FILE -- FLAG [VALUE ...] ...

The flags are those after `--` of scripts/sweep_imagenet_c.sh, meant for the baseline
(test_without_adaptation.py), test-time training (main_test_time_training.py) or both; each goes to the
scripts whose parser knows it. A flag neither knows is an error (exit 2), before any run starts.
"""
import importlib
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from util.cli import UserError, run_main  # noqa: E402

SWEPT = ('test_without_adaptation', 'main_test_time_training')


def split_flags(argv, parsers):
    """[(flag tokens, {script names that take the flag})] for argv."""
    groups, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith('--'):
            raise UserError(f"{token!r} after -- is not a flag (flags for the python scripts go after --)")
        name = token.split('=', 1)[0]
        takers = {s for s, p in parsers.items() if name in p._option_string_actions}
        if not takers:
            raise UserError(f"{name} is a flag of neither {' nor '.join(s + '.py' for s in parsers)}")
        action = next(p._option_string_actions[name] for s, p in parsers.items() if s in takers)
        j = i + 1
        if '=' not in token and action.nargs != 0:
            if action.nargs in (None, 1):
                j += 1
            else:  # several values: up to the next flag
                while j < len(argv) and not argv[j].startswith('--'):
                    j += 1
        groups.append((argv[i:j], takers))
        i = j
    return groups


def main(argv):
    if len(argv) < 4 or argv[3] != '--':
        raise UserError("usage: scripts/split_sweep_flags.py BASELINE_FILE TTT_FILE -- FLAGS")
    parsers = {s: importlib.import_module(s).get_args_parser() for s in SWEPT}
    groups = split_flags(argv[4:], parsers)
    for script, path in zip(SWEPT, argv[1:3]):
        with open(path, 'w') as f:
            f.write(''.join(t + '\0' for group, takers in groups if script in takers for t in group))


if __name__ == '__main__':
    run_main(main, sys.argv)
