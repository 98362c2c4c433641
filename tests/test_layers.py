"""The layers of docs/architecture.md, from the top: scripts, orchestration (engine_run.py), the online layer,
the fast layer, the trainers, the models, util/. A module imports only from its own layer or below (no entry
script from another), and the paper's script loads neither the online nor the fast layer until a flag asks."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO

ENTRY_SCRIPTS = ('main_pretrain', 'main_prob', 'main_test_time_training', 'main_online_ttt', 'test_without_adaptation')
LAYERS = [('scripts', ENTRY_SCRIPTS), ('orchestration', ('engine_run',)), ('online layer', ('engine_online',)),
          ('fast layer', ('engine_fast',)), ('trainers', ('engine_test_time', 'engine_pretrain', 'engine_prob')),
          ('models', ('models_mae', 'models_vit')), ('util', ('util',))]


def layer(module):
    for depth, (_, names) in enumerate(LAYERS):
        if module in names or module.split('.')[0] in names:
            return depth
    return None  # not the project's (torch, numpy, ...)


def project_imports(path):
    """The project's modules a file imports, anywhere in it (imports inside functions too)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names if node.module == 'util'}
    return {m for m in found if layer(m) is not None}


def library_files():
    return sorted(glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, 'util', '*.py')))


def test_every_module_has_a_layer():
    for path in library_files():
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        assert layer(name) is not None, name


@pytest.mark.parametrize('path', library_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_nothing_imports_upward_and_no_script_imports_another(path):
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
    for imported in project_imports(path):
        assert layer(imported) >= layer(name), f"{name} ({LAYERS[layer(name)][0]}) imports {imported} " \
                                              f"({LAYERS[layer(imported)][0]})"
        assert imported not in ENTRY_SCRIPTS, f"{name} imports the entry script {imported}"


def test_the_online_and_fast_layers_sit_beside_each_other():
    assert 'engine_fast' not in project_imports(os.path.join(REPO, 'engine_online.py'))
    assert 'engine_online' not in project_imports(os.path.join(REPO, 'engine_fast.py'))


def test_the_papers_script_loads_the_fast_and_online_layers_only_when_asked():
    code = ("import sys, main_test_time_training as s, engine_run\n"
            "args = s.get_args_parser().parse_args(['--data_path', 'd', '--resume_finetune', 'p'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('engine')))\n"
            "args.compile = True\n"
            "try:\n"
            "    engine_run.make_trainer(None, args, 'cpu')\n"
            "except Exception:\n"
            "    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('engine')))\n")
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    plain, asked = out.splitlines()
    assert plain == "['engine_run', 'engine_test_time']"
    assert asked == "['engine_fast', 'engine_run', 'engine_test_time']"
