"""Every module imports on its own, first, in a fresh interpreter; the ground
floor imports nothing above it.

`import xpmodel.X` always runs xpmodel/__init__.py first, whose import order
can hide a circle (config -> train -> loop -> config worked only because
__init__ reached train before config). So each module is imported here with
xpmodel/__init__.py left out: a bare `xpmodel` package whose __path__ is the
source folder, then `import xpmodel.X`, so X's own imports run first. A
circle between X and anything it reaches then fails as it would for the
first user to import X.
"""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from xpmodel import options
from xpmodel.layers import block

PACKAGE = Path(__file__).resolve().parent.parent / "xpmodel"
# xpmodel as a bare package: its submodules are found, and its __init__.py
# runs only when a module asks the package itself for a name (`from .. import
# __version__`), after that module's own imports have begun.
FIRST = """
import importlib, os, sys, types
folder, name = sys.argv[1], sys.argv[2]
package = types.ModuleType("xpmodel")
package.__path__, package.__package__ = [folder], "xpmodel"
package.__file__ = folder + "/__init__.py"

def __getattr__(attribute):
    if os.path.exists(os.path.join(folder, attribute + ".py")) or \
            os.path.isdir(os.path.join(folder, attribute)):
        raise AttributeError(attribute)    # a submodule: the import system loads it
    del package.__getattr__
    with open(package.__file__) as init:
        exec(compile(init.read(), package.__file__, "exec"), package.__dict__)
    return getattr(package, attribute)

package.__getattr__ = __getattr__
sys.modules["xpmodel"] = package
importlib.import_module(name)
"""
GROUND_FLOOR = {"xpmodel.atomic", "xpmodel.backend", "xpmodel.checks", "xpmodel.cpu_threads",
                "xpmodel.errors", "xpmodel.files", "xpmodel.ns_coefficients", "xpmodel.options"}


def module_names():
    """Dotted names of every module in the package, subpackages included."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_first(name, then=""):
    """Run `import name` (xpmodel/__init__.py skipped) and then `then` in a fresh
    interpreter; the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", FIRST + then, str(PACKAGE), name],
                          capture_output=True, text=True, timeout=300)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = module_names()
    assert "xpmodel.config" in names and "xpmodel.train.muon" in names and "xpmodel.cuda.gemm" in names
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(names, pool.map(import_first, names)))
    failed = {name: (result.stderr.strip().splitlines() or ["exit status %d" % result.returncode])[-1]
              for name, result in results.items() if result.returncode != 0}
    assert failed == {}


def test_the_package_imports_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", "import xpmodel"], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["xpmodel.config", "xpmodel.options", "xpmodel.ns_coefficients"])
def test_the_ground_floor_loads_nothing_above_it(name):
    result = import_first(name, "print(*sorted(m for m in sys.modules if m.startswith('xpmodel.')))")
    assert result.returncode == 0, result.stderr
    above = {m for m in result.stdout.split() if m.split(".")[:2] != name.split(".")[:2]
             and m not in GROUND_FLOOR}
    assert above == set()


def test_block_tables_implement_every_choice_the_config_offers():
    """A new norm or MLP is a name in options.py and an entry in block.py's tables."""
    assert tuple(block.NORM_LAYERS) == options.NORMS
    assert tuple(block.ACTIVATIONS) == options.MLPS


def test_the_command_starts_without_numpy_or_the_model():
    """`xpmodel` imports the heavy modules inside main()'s handling, so that a
    Ctrl-C in its first instant is one line, not an import's traceback; the
    package's names are still there when used."""
    script = ("import sys, xpmodel.cli.main; heavy = [m for m in ('numpy', 'xpmodel.model.gpt') "
              "if m in sys.modules]; import xpmodel; print(heavy, xpmodel.GPT.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "[] GPT\n", result.stderr
