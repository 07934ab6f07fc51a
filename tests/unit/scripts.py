"""Load one of scripts/ (Python files without a .py suffix) as a module, for the unit tests that drive them."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(file_name: str, module_name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / file_name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses in the script look their module up there
    loader.exec_module(module)
    return module
