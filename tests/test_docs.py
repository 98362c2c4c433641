"""The commands of the guides (README and docs/) run as written: each parses with its script's parser and,
run without the data it names, stops at the data check with one clear line."""
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

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


DOCS = ['README.md'] + sorted(f'docs/{n}' for n in os.listdir(os.path.join(REPO, 'docs')) if n.endswith('.md'))
INTERPRETERS = {'.py': ('python', 'python3', 'torchrun', 'torch.distributed.launch', 'torch.distributed.run'),
                '.sh': ('bash',), '.sbatch': ('sbatch', 'bash')}


def repo_script(token):
    """The repository's script a command token names (main_*.py, scripts/*, bench/*), or None."""
    token = token.lstrip('./')
    if re.fullmatch(r'(?:(?:scripts|bench)/)?[\w-]+\.(?:py|sh|sbatch)', token) and os.path.isfile(os.path.join(REPO, token)):
        return token
    return None


def doc_commands():
    """(doc, command) of every command in the README and docs/*.md, fenced or inline, that runs a script of this
    repository: a fenced line, or an inline code span, with the script and something after it or before it."""
    found = []
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        fenced = re.findall(r'```bash\n(.*?)```', text, flags=re.S)
        prose = re.sub(r'```.*?```', '', text, flags=re.S)
        candidates = [line for block in fenced for line in re.sub(r'\\\n', ' ', block).splitlines()]
        candidates += re.findall(r'`([^`]+)`', re.sub(r'\n', ' ', prose))
        for candidate in candidates:
            candidate = re.sub(r'\s#.*$', '', candidate).strip()
            for part in re.split(r'&&|;|\|', candidate):
                tokens = part.split()
                if len(tokens) > 1 and any(repo_script(t) for t in tokens):
                    found.append((doc, part.strip()))
    return found


def script_flags(script):
    """The flags a script takes: its parser's (python), or the options its case patterns take (shell)."""
    if script.endswith('.py'):
        name = os.path.splitext(os.path.basename(script))[0]
        spec = importlib.util.spec_from_file_location(f'doc_{name}', os.path.join(REPO, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, 'get_args_parser'):
            return set(module.get_args_parser()._option_string_actions)
        out = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True, text=True).stdout
        return set(re.findall(r'(?<![\w-])(--?[\w-]+)', out))
    with open(os.path.join(REPO, script)) as f:
        return set(re.findall(r'^\s*(--[\w-]+)\)', f.read(), flags=re.M))


COMMANDS_OF_DOCS = doc_commands()
FLAGS = {}


def test_the_docs_run_their_scripts_in_many_places():
    scripts = {repo_script(t) for _, c in COMMANDS_OF_DOCS for t in c.split() if repo_script(t)}
    assert len(COMMANDS_OF_DOCS) >= 40 and {'scripts/collect_results.py', 'scripts/sweep_imagenet_c.sh',
                                            'scripts/make_stream.py', 'main_online_ttt.py'} <= scripts


@pytest.mark.parametrize('doc, command', COMMANDS_OF_DOCS, ids=[f'{d}:{c[:40]}' for d, c in COMMANDS_OF_DOCS])
def test_each_documented_command_runs_as_written(doc, command):
    """The script exists, is run the way its file allows (python for .py, bash or sbatch for the shell
    scripts, or directly only with a run bit and a shebang), and every --flag it passes is in its --help
    (after a sweep's --, in the baseline's or the TTT script's, where they go)."""
    tokens = shlex.split(re.sub(r'\$\{?\w+\}?', 'X', command).replace('...', ''))
    at = next(i for i, t in enumerate(tokens) if repo_script(t))
    script = repo_script(tokens[at])
    before = ' '.join(tokens[max(0, at - 4):at])
    if not any(word in before.split() or word in before for word in INTERPRETERS[os.path.splitext(script)[1]]):
        path = os.path.join(REPO, script)
        with open(path) as f:
            assert at == 0 and os.access(path, os.X_OK) and f.readline().startswith('#!'), \
                f"{doc}: {script} is run as `{command}`, which its file does not allow"
    args = tokens[at + 1:]
    sweep = script in ('scripts/sweep_imagenet_c.sh', 'scripts/imagenet_c.sbatch')
    own, passed = (args[:args.index('--')], args[args.index('--') + 1:]) if '--' in args else (args, [])
    takes = FLAGS.setdefault(script, script_flags('scripts/sweep_imagenet_c.sh' if sweep else script))
    for flag in [t.split('=')[0] for t in own if t.startswith('--')]:
        assert flag in takes, f"{doc}: {script} takes no {flag} (`{command}`)"
    if passed:
        python = FLAGS.setdefault('python', script_flags('test_without_adaptation.py') |
                                  script_flags('main_test_time_training.py'))
        for flag in [t.split('=')[0] for t in passed if t.startswith('--')]:
            assert flag in python, f"{doc}: neither test-time script takes {flag} (`{command}`)"


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
    """docs/example.md's tables are, line for line, what scripts/paired_gain.py, scripts/score_stop_rules.py and
    scripts/collect_results.py make of the committed JSON of the example's run (docs/results/example/)."""
    import json
    import sys
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    import collect_results
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
              'stopping rules': chosen_table[:2 + len(chosen['chosen']['rows'])],
              'methods at their cost': rows('\n'.join(collect_results.methods_markdown(load('summary.json'))))}
    for name, lines in tables.items():
        found = [i for i in range(len(page) - len(lines) + 1) if page[i:i + len(lines)] == lines]
        assert len(lines) > 3 and found, name
    totals = {}
    with open(os.path.join(results, 'stage_times.tsv')) as f:
        for line in f.read().splitlines()[1:]:
            stage, _, seconds = line.split('\t')
            totals[stage] = seconds
    assert f"took {totals['total']} s" in ' '.join(page)


def test_the_objectives_recipes_are_the_codes():
    """docs/method.md's table of objectives gives each one's recipe: the same flags, parsed to the same values."""
    from main_online_ttt import get_args_parser
    from util.objectives import OBJECTIVES
    with open(os.path.join(REPO, 'docs', 'method.md')) as f:
        rows = re.findall(r'^\| `(\w+)`(?: \(default\))? \| [^|]+ \| (.+) \|$', f.read(), flags=re.M)
    documented = {name: re.findall(r'`([^`]+)`', cell) for name, cell in rows if name in OBJECTIVES}
    assert set(documented) == set(OBJECTIVES)
    for name, flags in documented.items():
        argv = shlex.split(' '.join(flags))
        assert sorted(a.lstrip('-').removeprefix('no_') for a in argv if a.startswith('--')) == \
            sorted(OBJECTIVES[name].recipe), name
        args = get_args_parser().parse_args(['--data_path', 'd', '--resume_finetune', 'p', *argv])
        assert {k: getattr(args, k) for k in OBJECTIVES[name].recipe} == OBJECTIVES[name].recipe, name
