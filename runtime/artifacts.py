"""Hash-keyed cached artifacts and atomic writes.

Four things are built once and reused whenever everything they depend on is the same: the self-built
offline models, the SFT model, the reward model and the DPO reference log-probs. Each is an
:class:`Artifact`: its path carries a hash of its settings, it counts as built only once its last file
is in place, and it is written into a temporary path of its own process and renamed, so an interrupted build
leaves nothing half written and two builders never write into each other's files. A long build holds a lock
(:meth:`Artifact.building`): another run that needs the same artifact meanwhile says so in one line and waits
for it. Free of torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
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
        atomic_write(self.path, write, directory=not self.path.suffix)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def builder(self) -> int | None:
        """The process id in this artifact's lock when that process is alive (another run building it), else
        None."""
        try:
            pid = int(self.lock_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and pid != os.getpid() and _alive(pid) else None

    def wait_for_builder(self, what: str, poll_s: float = 2.0) -> None:
        """If another live process is building this artifact, say so in one line and wait until it is done (or
        gone); the caller then checks :meth:`exists` again."""
        pid = self.builder()
        if pid is None:
            return
        print(f"{what}: another run (process {pid}) is building {self.path}; waiting for it (lock "
              f"{self.lock_path})", flush=True)
        while self.builder() is not None:
            time.sleep(poll_s)

    @contextlib.contextmanager
    def building(self):
        """Hold this artifact's lock (a file with this process's id) while building it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path.write_text(str(os.getpid()))
        try:
            yield
        finally:
            if self.lock_path.exists() and self.lock_path.read_text().strip() == str(os.getpid()):
                self.lock_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, finished but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): trust the signal
        return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so that at every moment one complete version exists on disk."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(final: Path, write, directory: bool = False) -> None:
    """Call ``write(tmp)`` and move the result to ``final``: a file, or with ``directory`` a directory (``tmp``
    made empty first). ``tmp`` is this process's own sibling of ``final``, never another writer's; on any exception
    it is removed and ``final`` is untouched, so a reader sees the old version or the new one, whole. The one
    atomic write of the repository: files (results.json, metrics.jsonl on resume, the scripts' JSON records) and
    directories (the self-built models, cached artifacts) alike."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if directory:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise
    if directory:
        replace_dir(tmp, final)
    else:
        tmp.replace(final)


def atomic_write_dir(final: Path, write) -> None:
    """Fill a directory with ``write(tmp_dir)`` and move it to ``final`` atomically (:func:`atomic_write`)."""
    atomic_write(final, write, directory=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
