"""Two small registries, so that no base class ever imports or dispatches to its own subclasses.

- **Member formats** (``"full"``: whole ``save_pretrained`` models; ``"peft_lora"``: LoRA adapters on one
  base): what ``ensemble_config.json``'s ``member_format`` names. A format registers how a saved ensemble of
  its members is loaded; its ensemble class knows how to average (``soup``) and save (``_save_members``) them.
  `EnsembleModel.from_pretrained` asks the registry, so the adapter format (and peft) is imported only when an
  adapter repo is loaded.
- **Task classes**: which ensemble class serves members of an architecture (``*ForImageClassification`` ->
  `EnsembleForImageClassification`, ``*ForCausalLM`` -> `EnsembleModelForCausalLM`, ...), per member format.
  Each class registers itself where it is defined.

Modules that register a format on import but are loaded lazily (peft is optional for full-model users) are
declared by the package root (`declare_provider`), as transformers' Auto mappings name modules by string.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MemberFormat",
    "register_member_format",
    "member_format",
    "register_task_class",
    "task_class",
    "declare_provider",
]


@dataclass(frozen=True)
class MemberFormat:
    """One member format: `load(path, saved_config, config, base_model, num_labels, hub_kwargs, **kw)` builds
    the ensemble saved in `path` whose checked `EnsembleConfig` is `saved_config`."""

    name: str
    load: Callable


_FORMATS: dict[str, MemberFormat] = {}
_TASK_CLASSES: dict[str, list[tuple[tuple[str, ...], type]]] = {}
_PROVIDERS: dict[str, tuple[str, ...]] = {}


def declare_provider(member_format: str, *modules: str) -> None:
    """`modules` register `member_format` (its loader and task classes) when imported: import them on first
    use of that format."""
    _PROVIDERS[member_format] = modules


def _provide(member_format: str) -> None:
    for module in _PROVIDERS.get(member_format, ()):
        importlib.import_module(module)


def register_member_format(fmt: MemberFormat) -> None:
    _FORMATS[fmt.name] = fmt


def member_format(name: str) -> MemberFormat | None:
    """The registered format `name` (its provider imported if needed), or None if hf-ens knows none."""
    if name not in _FORMATS:
        _provide(name)
    return _FORMATS.get(name)


def register_task_class(member_format: str, suffixes: tuple[str, ...], cls: type) -> None:
    """Members of an architecture ending in one of `suffixes`, in `member_format`, are served by `cls`."""
    entries = _TASK_CLASSES.setdefault(member_format, [])
    entries[:] = [e for e in entries if e[1] is not cls] + [(tuple(suffixes), cls)]


def task_class(member_format: str, architecture: str | None) -> type | None:
    """The registered ensemble class for members of `architecture` in `member_format`, or None."""
    _provide(member_format)
    name = architecture or ""
    return next(
        (cls for suffixes, cls in _TASK_CLASSES.get(member_format, ()) if name.endswith(suffixes)), None
    )
