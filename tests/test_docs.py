"""The commands of the guides (README and docs/) run as written: each parses with its script's parser and,
run without the data it names, stops at the data check with one clear line."""
import importlib
import os
import re
import shlex

import pytest

from conftest import REPO, check_error_line
from util.cli import run_main

GUIDES = ['README.md', 'docs/reproduce.md', 'docs/training.md', 'docs/datasets.md', 'docs/online.md',
          'docs/own_data.md']
SCRIPTS = ('main_pretrain', 'main_prob', 'main_test_time_training', 'main_online_ttt', 'test_without_adaptation')


def guide_commands():
    """(guide, script, argv) of every python command of the guides' bash blocks (fragments with '...'
    left out)."""
    found = []
    for guide in GUIDES:
        with open(os.path.join(REPO, guide)) as f:
            text = f.read()
        for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
            for line in re.sub(r'\\\n', ' ', block).splitlines():
                line = re.sub(r'\s#.*$', '', line).strip()
                match = re.search(r'(?:^|\s)python (\w+)\.py (.*)$', line)
                if not match or match.group(1) not in SCRIPTS or '...' in line.split():
                    continue
                argv = re.sub(r'\$\{?(\w+)\}?', lambda m: f'/placeholder/{m.group(1)}', match.group(2))
                found.append((guide, match.group(1), shlex.split(argv)))
    return found


COMMANDS = guide_commands()


def test_the_guides_have_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert len(COMMANDS) >= 9


@pytest.mark.parametrize('guide, script, argv', COMMANDS, ids=[f'{g}:{s}' for g, s, _ in COMMANDS])
def test_command_parses_and_reaches_the_data_check(guide, script, argv, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # the data folders the guides name do not exist here
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(argv + ['--device', 'cpu'])
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(module.main, args)
    out, err = capfd.readouterr()
    line = check_error_line(e.value.code, out, err, [])
    assert 'not found' in line and ('data folder' in line or 'checkpoint' in line), line


def test_the_readme_stays_short():
    with open(os.path.join(REPO, 'README.md')) as f:
        assert len(f.read().split()) <= 1500


def test_user_docs_say_nothing_of_the_machines_the_code_is_developed_on():
    """Studies and tuning logs live in docs/notes/; the rest is for users."""
    pattern = re.compile(r'\blease|\blent\b|at hand|where this code is developed|development machine', re.I)
    for root, _, files in os.walk(os.path.join(REPO, 'docs')):
        if os.path.relpath(root, REPO).startswith(os.path.join('docs', 'notes')):
            continue
        for name in files:
            if name.endswith('.md'):
                with open(os.path.join(root, name)) as f:
                    found = pattern.findall(f.read())
                assert not found, (name, found)
    with open(os.path.join(REPO, 'README.md')) as f:
        assert not pattern.findall(f.read())


def test_every_linked_doc_exists():
    for guide in ['README.md'] + [f'docs/{n}' for n in os.listdir(os.path.join(REPO, 'docs')) if n.endswith('.md')]:
        with open(os.path.join(REPO, guide)) as f:
            for target in re.findall(r'\]\(([^)#]+?)(?:#[^)]*)?\)', f.read()):
                if not target.startswith('http'):
                    assert os.path.exists(os.path.join(REPO, os.path.dirname(guide), target)), (guide, target)


def test_the_examples_tables_are_its_committed_results():
    """docs/example.md's tables are, line for line, what scripts/paired_gain.py and scripts/score_stop_rules.py make
    of the committed JSON of the example's run (docs/results/example/)."""
    import json
    import sys
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    import paired_gain
    import score_stop_rules as step_rules
    results = os.path.join(REPO, 'docs', 'results', 'example')
    with open(os.path.join(REPO, 'docs', 'example.md')) as f:
        page = f.read().splitlines()

    def load(name):
        with open(os.path.join(results, name)) as f:
            return json.load(f)

    def rows(markdown):
        return [line for line in markdown.splitlines() if line.startswith('|')]
    chosen = load('step_rules.json')
    chosen_table = rows(step_rules.markdown({**chosen, 'rows': []}))  # the chosen rules, and an empty full table
    tables = {'paired gains': rows(paired_gain.markdown(load('paired_gain.json'))),
              'streams': rows(paired_gain.markdown(load('streams_paired_gain.json'), with_mean=False)),
              'stopping rules': chosen_table[:2 + len(chosen['chosen']['rows'])]}
    for name, lines in tables.items():
        found = [i for i in range(len(page) - len(lines) + 1) if page[i:i + len(lines)] == lines]
        assert len(lines) > 3 and found, name
    totals = {}
    with open(os.path.join(results, 'stage_times.tsv')) as f:
        for line in f.read().splitlines()[1:]:
            stage, _, seconds = line.split('\t')
            totals[stage] = seconds
    assert f"took {totals['total']} s" in ' '.join(page)
