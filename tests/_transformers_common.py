"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``): version-matched, fetched.

The installed transformers wheel has no tests, so the test modules are taken from the same version's source
distribution on the package registry (``pip download --no-binary :all: transformers==<installed>``, the
registry CI installs from too) and cached in ``$HF_ENS_CACHE`` (default ``~/.cache/hf_ens``) under
``transformers-tests/<version>/``. Only the top-level ``tests/*.py`` modules are extracted, as the package
``transformers_common_tests`` (not ``tests``, which is this project's).

The sdist ships ``tests/*.py`` but not the sub-packages three of them import. Those get stand-ins, written
next to the real modules and named in `STAND_INS`:

- ``exporters/test_export.py`` (``ExportTesterMixin``, a base of ``ModelTesterMixin``): an empty mixin. The
  export tests (torch.export / ONNX / OpenVINO / ExecuTorch drivers) therefore do not run here.
- ``generation/test_utils.py`` (``GenerationTesterMixin``): an empty class; ``ModelTesterMixin`` only checks
  that a model that cannot ``generate`` does not inherit it, which an ensemble classifier does not.
- ``utils/test_configuration_utils.py`` (``config_common_kwargs``): an empty dict; ``ConfigTester`` reads it
  only for configs without sub-configs, and `EnsembleConfig` has one (``member_config``).

When the registry cannot be reached the tests are skipped with the reason, except under CI (``CI=true``),
where that is an error: a lane that silently skipped would pass with nothing tested.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import transformers
from filelock import FileLock

PACKAGE = "transformers_common_tests"
MODULES = ("test_modeling_common", "test_configuration_common")
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_ens"
    return Path(os.environ.get("HF_ENS_CACHE", default)) / "transformers-tests" / transformers.__version__


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fetch(root: Path) -> None:
    """Download the sdist of the installed version and extract ``tests/*.py`` as `PACKAGE` under `root`."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="hf-ens-tf-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--no-build-isolation", "-q", "-d", tmp, f"transformers=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not sdists:  # pip may fail preparing metadata after the download: the archive is all we need
            raise RuntimeError(
                f"pip download of transformers=={version} failed: {done.stderr.strip()[-800:]}"
            )
        package = Path(tmp) / PACKAGE
        package.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (package / parts[2]).write_bytes(tar.extractfile(member).read())
        missing = [m for m in MODULES if not (package / f"{m}.py").is_file()]
        if missing:
            raise RuntimeError(f"The transformers=={version} sdist has no tests/{missing[0]}.py.")
        (package / "__init__.py").touch()
        for rel, text in STAND_INS.items():
            path = package / rel
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            if not path.exists():  # a later sdist that ships the real module keeps it
                path.write_text(
                    f"# hf-ens stand-in: the transformers sdist does not ship tests/{rel}\n{text}"
                )
        root.mkdir(parents=True, exist_ok=True)
        os.replace(package, root / PACKAGE)


def fetch() -> Path:
    """The folder holding `PACKAGE` for the installed transformers, fetched once per version (cached)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if not (root / PACKAGE / "__init__.py").is_file():
            _fetch(root)
    return root


def load_or_skip() -> SimpleNamespace:
    """The common test modules, or a module-level skip with the reason when they cannot be fetched (an error
    under CI: see the module docstring). An import error (e.g. ``parameterized`` not installed: ``.[dev]``)
    is not a fetch problem and fails as it is."""
    import pytest

    try:
        root = fetch()
    except Exception as e:
        reason = (
            f"transformers' common tests for {transformers.__version__} could not be fetched from the "
            f"package registry ({type(e).__name__}: {e})"
        )
        if in_ci():
            raise RuntimeError(f"{reason}; CI must run them.") from e
        pytest.skip(reason, allow_module_level=True)
    if PACKAGE not in sys.modules:  # the fetched package, found in its folder (sys.path is left alone)
        spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [str(root)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return SimpleNamespace(**{m: importlib.import_module(f"{PACKAGE}.{m}") for m in MODULES})
