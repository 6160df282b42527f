"""Hub preflight for the recipes: fail in one line, before anything is loaded, when a run needs the Hub and
cannot have it (offline mode, no network), instead of a client spending half a minute in retries.

Everything goes through `huggingface_hub`: its endpoint and offline settings (`constants`), its cache layout
(`repo_folder_name`) and its HTTP session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import get_session

from recipes._cli import ConfigError

__all__ = [
    "HubUnreachableError",
    "in_hub_cache",
    "hub_unreachable_reason",
    "check_hub",
    "is_connection_error",
]


class HubUnreachableError(ConfigError):
    """The run needs Hub repos but the Hub cannot be reached (offline, no network): one line, no retries."""


def in_hub_cache(kind: str, repo_id: str) -> bool:
    """Whether the local Hub cache holds (part of) the `kind` (``"model"``, ``"dataset"``) repo `repo_id`."""
    return os.path.isdir(
        os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=kind))
    )


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, or no answer to one HEAD request), or None if it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(
            constants.ENDPOINT, timeout=timeout
        )  # any HTTP answer, even an error status, will do
    except Exception as err:  # connection refused, DNS, timeout: the client's own error types
        return f"{constants.ENDPOINT} did not answer: {err}"
    return None


def check_hub(repos: Sequence[tuple[str, str]], offline_command: str) -> None:
    """Raise `HubUnreachableError` naming `repos` ((kind, repo id) pairs the run downloads) and the offline
    command to run instead, when they are needed and the Hub cannot be reached. Under HF_HUB_OFFLINE repos
    already in the local Hub cache are fine."""
    if not repos or (constants.HF_HUB_OFFLINE and all(in_hub_cache(kind, repo) for kind, repo in repos)):
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        raise unreachable(repos, reason, offline_command)


def unreachable(repos: Sequence[tuple[str, str]], reason: str, offline_command: str) -> HubUnreachableError:
    """The one-line error for `repos` the Hub could not serve, naming the offline command to run instead."""
    names = " and ".join(f"{kind} {repo!r}" for kind, repo in repos)
    return HubUnreachableError(
        f"cannot load {names}: the Hub cannot be reached ({reason}). "
        f"Run the embedded offline default instead: {offline_command}."
    )


def is_connection_error(err: BaseException | None) -> bool:
    """A network failure anywhere in the chain of `err` (clients wrap them in OSError or their own types)."""
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
            return True
        module = type(err).__module__.split(".")[0]
        if (
            module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
            and "Connect" in type(err).__name__
        ):
            return True
        err = err.__cause__ or err.__context__
    return False
