"""The one record format of every script in benchmarks/: ``--json PATH`` writes what a run measured.

A record is a JSON object: the command line, the UTC date, the git commit (and whether the code differs
from it), the machine (CPU model, cores, load average at the start and the end, torch / transformers / peft
versions, torch threads, GPU if any), the script's settings, the figures it printed as numbers, and
``--note`` (say there whether the machine was loaded: a figure taken under load is not a clean speed).
docs/benchmarks.md quotes figures from the records committed in docs/results/benchmarks/.

    parser = argparse.ArgumentParser(...)
    _record.add_arguments(parser)
    args = parser.parse_args()
    ...
    _record.write(args.json, "script_name", settings=vars(args), figures={...}, note=args.note)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "benchmarks"
CODE = ("hf_ens", "trainers", "recipes", "benchmarks", "pyproject.toml")  # what "dirty" looks at
# environment variables that change what a benchmark measures: written into the command when set
ENV_KEYS = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")
_ENV_AT_START = {key: os.environ[key] for key in ENV_KEYS if key in os.environ}  # before a script sets any
_LOAD_AT_START = os.getloadavg()
_STARTED = datetime.datetime.now(datetime.timezone.utc)


def add_arguments(parser) -> None:
    """``--json PATH`` and ``--note TEXT`` on an argparse parser."""
    parser.add_argument("--json", default=None, metavar="PATH", help="also write a record of this run here")
    parser.add_argument(
        "--note", default=None, metavar="TEXT", help="a note for the record (what else loaded the machine)"
    )


def pop_arguments(argv: list[str]) -> tuple[list[str], str | None, str | None]:
    """``--json PATH`` / ``--note TEXT`` taken out of an argv a script parses itself: (rest, json, note)."""
    rest, found = [], {"--json": None, "--note": None}
    items = iter(argv)
    for item in items:
        key, eq, value = item.partition("=")
        if key in found:
            found[key] = value if eq else next(items, None)
            if found[key] is None:
                raise SystemExit(f"{key} needs a value")
        else:
            rest.append(item)
    return rest, found["--json"], found["--note"]


def command(argv: list[str] | None = None) -> str:
    """The command line that ran, from the repository root (``PYTHONPATH=.`` and other relevant variables
    as they were set when the script started)."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script_text = script.relative_to(ROOT).as_posix()
    except ValueError:
        script_text = argv[0]
    env = []
    for key, value in _ENV_AT_START.items():
        if key == "PYTHONPATH" and Path(value).resolve() == ROOT:
            value = "."
        env.append(f"{key}={shlex.quote(value)}")
    return " ".join([*env, "python", script_text, *map(shlex.quote, argv[1:])])


def _git() -> dict:
    def out(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    # dirty: the code a benchmark runs differs from the commit (docs and records being edited do not count)
    changed = out("status", "--porcelain", "--", *CODE)
    return {"commit": out("rev-parse", "HEAD") or None, "dirty": bool(changed)}


_GIT_AT_START = _git()  # the code that ran: a commit made while a long benchmark runs is not it


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def machine() -> dict:
    """The machine a record was taken on."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
    }


def _plain(value):
    """JSON-able: paths and other objects as strings, tuples as lists, floats rounded to 6 significant
    digits (what a figure means; the rest is timer noise)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def record(benchmark: str, settings: dict, figures: dict, note: str | None = None) -> dict:
    settings = {k: v for k, v in settings.items() if k not in ("json", "note")}
    ended = datetime.datetime.now(datetime.timezone.utc)
    return {
        "benchmark": benchmark,
        "command": command(),
        "date": _STARTED.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_seconds": round((ended - _STARTED).total_seconds(), 1),
        "git": _GIT_AT_START,
        "machine": machine(),
        "note": note,
        "settings": _plain(settings),
        "figures": _plain(figures),
    }


def write(path: str | os.PathLike | None, benchmark: str, settings: dict, figures: dict, note=None) -> None:
    """Write the record of this run to `path` (nothing when `path` is None, i.e. no ``--json``)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record(benchmark, settings, figures, note), indent=2) + "\n")
    print(f"record written to {path}", file=sys.stderr)
