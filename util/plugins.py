"""--plugin PATH_OR_MODULE: a researcher's own file or module, imported before anything is built, so that what it
registers (models: models_mae.register_model; objectives: util/objectives.register_objective; rules for
which parameters adapt: util/finetune_modes.register_finetune_mode) exists under its name. Each plugin is
recorded by its file's path and SHA-256 (docs/method.md, "Extending")."""
import importlib
import importlib.util
import os
import sys

from util.errors import UserError
from util.io import file_sha256


_LOADED = {}  # path -> SHA-256 of the file as imported: a script run twice in one process imports it once


def load_plugin(spec):
    """Import a .py file (a path) or a module (a dotted name on the Python path); {'path', 'sha256'} of its file.
    A file that is not there, a module that cannot be found, or one that raises on import: a UserError."""
    if spec.endswith('.py') or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise UserError(f"--plugin {spec}: file not found")
        sha256 = file_sha256(path)
        if _LOADED.get(path) != sha256:
            name = f"plugin_{os.path.splitext(os.path.basename(path))[0]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                _run(lambda: module_spec.loader.exec_module(module), spec, path)
            except UserError:
                del sys.modules[name]
                raise
            _LOADED[path] = sha256
        return {'path': path, 'sha256': sha256}
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        found = None
    except Exception as e:  # a package on the way raised on import
        raise UserError(f"--plugin {spec}: importing it raised {type(e).__name__}: {e}".splitlines()[0]) from None
    if found is None or not found.origin:
        raise UserError(f"--plugin {spec}: no such module (a file needs its path, e.g. ./{spec}.py)")
    if not os.path.isfile(found.origin):
        raise UserError(f"--plugin {spec}: a module built into Python, not a file of your own")
    _run(lambda: importlib.import_module(spec), spec, found.origin)
    return {'path': found.origin, 'sha256': file_sha256(found.origin)}


def _run(load, spec, path):
    try:
        load()
    except (UserError, KeyboardInterrupt):
        raise
    except BaseException as e:  # the plugin's own error, whatever it is (SystemExit too), as one line naming the file
        raise UserError(f"--plugin {spec}: {path} raised {type(e).__name__}: {e}".splitlines()[0]) from None
