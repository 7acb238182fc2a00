"""Hash-keyed cached artifacts and atomic writes.

Four things are built once and reused whenever everything they depend on is the same: the self-built
offline models, the SFT model, the reward model and the DPO reference log-probs. Each is an
:class:`Artifact`: its path carries a hash of its settings, it counts as built only once its last file
is in place, and it is written into a temporary path and renamed, so an interrupted build leaves nothing
half written. Free of torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def settings_key(settings, digits: int = 12) -> str:
    """The first ``digits`` hex digits of the SHA-256 of ``settings`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:digits]


class Artifact:
    """``<root>/<prefix><key><suffix>``, a directory (or with a ``suffix``, a file) built from ``settings``.

    ``done``: the file inside the directory written last (a report), whose presence means the build finished;
    without it, the path existing is enough (it only ever appears whole).
    """

    def __init__(self, root, settings, prefix: str = "", suffix: str = "", done: str = "", digits: int = 12):
        self.settings, self.done = settings, done
        self.key = settings_key(settings, digits)
        self.path = Path(root) / f"{prefix}{self.key}{suffix}"

    def exists(self) -> bool:
        return (self.path / self.done).exists() if self.done else self.path.exists()

    def report(self) -> dict:
        """The finished build's ``done`` file (JSON)."""
        return json.loads((self.path / self.done).read_text())

    def write(self, write) -> None:
        """Build the artifact with ``write(tmp_path)``, then move it into place (a directory, or a file when the
        artifact has a suffix)."""
        if self.path.suffix:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            write(tmp)
            tmp.rename(self.path)
        else:
            atomic_write_dir(self.path, write)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so that at every moment one complete version exists on disk."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` and move the result to ``final``; on any exception ``final`` is untouched."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
