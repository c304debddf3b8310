"""The wheel and the sdist as a user or a packager gets them.

Both are built from a copy of the source tree (so a stale build/ folder cannot
fill in what the configuration leaves out), and the wheel's file list must be
exactly the package tree: every module, kernel and shipped config, nothing
else. A new subpackage or data file that the build would miss fails here.
"""
import ast
import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Folders and files of a working tree that are not sources (see .gitignore).
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.py[cod]", "*.egg-info",
                                     "build", "dist", "runs", "out", ".pytest_cache")
# Where each folder of the tree lands in the installed package (pyproject's package-dir).
INSTALLED_AS = {"xpmodel": "xpmodel", "configs": "xpmodel/configs"}


def source_files(folder):
    """Paths relative to REPO of the source files below REPO/folder."""
    root = REPO / folder
    return {p.relative_to(REPO).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def version():
    """xpmodel.__version__ as the source file states it."""
    tree = ast.parse((REPO / "xpmodel" / "__init__.py").read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{"wheel": path, "sdist": path}, built without network or build isolation."""
    pytest.importorskip("setuptools", minversion="77")   # pyproject's build-system requirement
    tree = tmp_path_factory.mktemp("packaging") / "xpmodel"
    shutil.copytree(REPO, tree, ignore=NOT_SOURCES)
    dist = tree / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", dist, tree], check=True, cwd=tree)
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", dist],
                   check=True, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_the_wheel_holds_exactly_the_package_tree(built):
    expected = {name.replace(folder, installed, 1)
                for folder, installed in INSTALLED_AS.items() for name in source_files(folder)}
    assert "xpmodel/cuda/compile.py" in expected and "xpmodel/configs/default.yaml" in expected
    with zipfile.ZipFile(built["wheel"]) as wheel:
        shipped = {n for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert sorted(expected - shipped) == [], "left out of the wheel"
    assert sorted(shipped - expected) == [], "in the wheel but not in the package tree"


def wheel_metadata(built):
    """The wheel's METADATA as an email message."""
    with zipfile.ZipFile(built["wheel"]) as wheel:
        return email.message_from_string(wheel.read(f"xpmodel-{version()}.dist-info/METADATA").decode())


def test_the_wheel_metadata_is_ready_for_an_index(built):
    dist_info = f"xpmodel-{version()}.dist-info"
    metadata = wheel_metadata(built)
    with zipfile.ZipFile(built["wheel"]) as wheel:
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert built["wheel"].name == f"xpmodel-{version()}-py3-none-any.whl"
    assert metadata["Name"] == "xpmodel" and metadata["Version"] == version()
    assert metadata["License-Expression"] == "MIT" and license_text.startswith("MIT License")
    assert metadata["Requires-Python"] == ">=3.10"
    assert "Programming Language :: Python :: 3.10" in metadata.get_all("Classifier")
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (REPO / "README.md").read_text().strip()
    assert "xpmodel = xpmodel.cli.main:main" in entry_points
    requires = metadata.get_all("Requires-Dist")
    for name in ("numpy", "ml_dtypes", "rich", "pyyaml", "regex", "safetensors", "threadpoolctl"):
        assert any(r.startswith(f"{name}>=") and "extra ==" not in r for r in requires), name


def test_the_readme_names_every_runtime_dependency(built):
    runtime = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in wheel_metadata(built).get_all("Requires-Dist")
               if "extra ==" not in r}
    sentence = re.search(r"The runtime needs only ([^.]*)\.", " ".join((REPO / "README.md").read_text().split()))
    named = set(re.findall(r"[a-z][a-z0-9_]*", re.sub(r"\([^)]*\)", "", sentence[1]))) - {"and"}
    assert "ml_dtypes" in runtime and named == runtime


def test_the_tensorboard_extra_brings_the_tensorboard_command(built):
    # the README's `pip install 'xpmodel[tensorboard]'` is followed by `tensorboard --logdir`
    extra = [r.split(";")[0] for r in wheel_metadata(built).get_all("Requires-Dist")
             if 'extra == "tensorboard"' in r]
    assert sorted(r.split(">=")[0] for r in extra) == ["tensorboard", "tensorboardX"]


def test_the_sdist_holds_the_sources_their_tests_and_the_license(built):
    prefix = f"xpmodel-{version()}/"
    with tarfile.open(built["sdist"]) as sdist:
        names = {m.name[len(prefix):] for m in sdist.getmembers() if m.isfile()}
    expected = set().union(*(source_files(folder) for folder in ("xpmodel", "configs", "tests", "tools",
                                                                 "docs")))
    expected |= {"pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"}
    assert sorted(expected - names) == [], "left out of the sdist"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def run_xpmodel(*args, module):
    """(exit code, stdout, stderr) of `python -m xpmodel ARGS` or of the
    console script's entry point, xpmodel.cli.main:main, in a fresh process."""
    entry = ["-m", "xpmodel"] if module else ["-c", "import sys; from xpmodel.cli.main import main; sys.exit(main())"]
    done = subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"], [], ["no-such-command"],
                                  ["train", "--config", "no-such-config"]])
def test_python_m_xpmodel_works_like_the_command(args):
    assert run_xpmodel(*args, module=True) == run_xpmodel(*args, module=False)


def test_version_is_the_package_version():
    code, out, _ = run_xpmodel("--version", module=True)
    assert code == 0 and out.strip() == f"xpmodel {version()}"
