"""Loading what registers passes and targets: installed entry points and --load-pass-plugin modules.

Built-in passes and targets are packages named by this project's own entry points, so the core reaches
them the same way it reaches any plugin. A plugin module is imported only when the user names it.
"""

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from reccc.errors import UsageError

PASS_GROUP = "reccc.passes"
TARGET_GROUP = "reccc.targets"

_loaded_groups: set[str] = set()
_loaded_plugins: set[str] = set()


def load_entry_points(group: str) -> None:
    """Import every module registered under `group` (once per process)."""
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        try:
            point.load()
        except Exception as error:
            raise UsageError(f"plugin '{point.name}' ({point.value}) in '{group}' failed to load: {error}") from error


def load_pass_plugin(spec: str) -> None:
    """Import a pass plugin given as a module name (`my_pkg.passes`) or a path to a .py file (once per process)."""
    path = Path(spec)
    key = str(path.resolve()) if spec.endswith(".py") else spec
    if key in _loaded_plugins:
        return
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise UsageError(f"--load-pass-plugin: {spec}: no such file")
            module_name = f"reccc_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UsageError:
        raise
    except ModuleNotFoundError as error:
        raise UsageError(f"--load-pass-plugin: cannot import '{spec}': {error}") from error
    except Exception as error:
        raise UsageError(f"--load-pass-plugin: '{spec}' failed to load: {type(error).__name__}: {error}") from error
    _loaded_plugins.add(key)
