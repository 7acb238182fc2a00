"""Is the model hub usable? Answered in seconds, before the data is read or torch is imported.

:func:`hub_preflight` runs first in ``main.py``: hub ids already in the local Hugging Face cache are then
loaded from it (``local_files_only``) when the hub is unreachable or ``HF_HUB_OFFLINE=1`` is set; a missing
one is reported at once in one line, instead of after a minute of download retries.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from config import ConfigError


def looks_local(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else (./x, /abs, a/b/c, ~, an existing path) is a directory."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


LOCAL_FILES_ONLY = False  # set by hub_preflight when the hub cannot be used: load from the local cache only


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 4.0) -> bool:
    """One HEAD request to the hub's endpoint, no retries (honours HTTPS_PROXY); any HTTP answer counts."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError) or an invalid id: either way not usable offline
        return False
    return True


def hub_preflight(needed: list[tuple[str, str, str]]) -> None:
    """Check, before minutes of work, that every hub id in ``needed`` can be loaded.

    Args:
        needed: ``(what, flag, repo_id)``, e.g. ``("model", "--policy_model", "distilgpt2")``; local paths
            are skipped (their own loader checks them). A ``what`` of ``"dataset"`` is a hub dataset.
    Raises:
        ConfigError naming the first id that is neither in the local cache nor downloadable, and the two ways
        out. When every id is cached but the hub is unusable, later loads read the cache only.
    """
    global LOCAL_FILES_ONLY
    for what, flag, name in needed:
        if what != "dataset" and looks_local(name) and not Path(name).expanduser().is_dir():
            raise ConfigError(f"{flag} {name}: no such directory; give a directory with a saved {what}, or a hub id "
                              f"(such as {'distilgpt2' if flag == '--policy_model' else 'the default'})")
    ids = [(what, flag, name) for what, flag, name in needed if not looks_local(name)]
    if not ids:
        return
    offline = hub_offline_requested() or not hub_reachable()
    if not offline:
        return
    LOCAL_FILES_ONLY = True
    why = "HF_HUB_OFFLINE=1 is set" if hub_offline_requested() else "the model hub is unreachable"
    for what, flag, name in ids:
        if not in_hub_cache(name, "dataset" if what == "dataset" else "model"):
            if what == "dataset":
                raise ConfigError(f"no IMDb data: data/IMDB Dataset.csv is missing, {why} and the hub dataset {name} "
                                  f"is not in the local cache; put 'IMDB Dataset.csv' in data/ or pass --data PATH")
            raise ConfigError(f"cannot load {what} {name!r}: {why} and it is not in the local cache; use --preset "
                              f"quick (small models built from IMDb here, about 2 minutes on a CPU), --preset offline "
                              f"(the full study's, built once in about 14 minutes) or a local directory "
                              f"({flag} PATH)")
