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
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from config import ConfigError


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
        """The process id of another live process that holds this artifact's lock (building it), else None. The
        lock is an ``flock`` on the lock file: the kernel drops it when its holder dies, however it dies, so a
        killed builder's lock, or one whose process id has been reused since, holds nobody up."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: nobody builds
            return None
        except BlockingIOError:
            try:
                pid = int(os.read(fd, 32).decode().strip() or 0) or -1
            except ValueError:
                pid = -1
            return None if pid == os.getpid() else pid  # this process's own lock is no other builder
        finally:
            os.close(fd)

    def wait_for_builder(self, what: str, poll_s: float = 2.0, limit_s: float = 4 * 3600) -> None:
        """If another live process is building this artifact, say so in one line and wait until it is done (or
        gone), at most ``limit_s`` (then a ConfigError naming the lock); the caller then checks :meth:`exists`
        again."""
        pid = self.builder()
        if pid is None:
            return
        print(f"{what}: another run (process {pid}) is building {self.path}; waiting for it, at most "
              f"{limit_s / 3600:g} h (lock {self.lock_path})", flush=True)
        deadline = time.monotonic() + limit_s
        while self.builder() is not None:
            if time.monotonic() > deadline:
                raise ConfigError(f"{what}: process {pid} has held {self.lock_path} for over {limit_s / 3600:g} h "
                                  f"while building {self.path}; stop it, or pass another --cache_dir")
            time.sleep(poll_s)

    @contextlib.contextmanager
    def building(self, what: str = "build", poll_s: float = 2.0, limit_s: float = 4 * 3600):
        """Hold this artifact's lock, exclusively, while building it: yields True when this process should build
        (it holds the lock and the artifact is not there), False when another process built it meanwhile (this
        one waited for it: :meth:`wait_for_builder`). Two runs started together never both build."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.wait_for_builder(what, poll_s, limit_s)
                if self.exists():
                    yield False
                    return
                continue
            # The file locked may have been unlinked by its last holder after this process opened it: then
            # another process may hold a lock on a new file at the same path. Lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield not self.exists()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()  # while still holding it: a waiter then locks a new file
            os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so that at every moment one complete version exists on disk."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    with signals_held():  # a Ctrl-C between the renames would leave no version at ``final``
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back for the block and deliver them after it, in the order they came.

    Python runs a signal's handler in the main thread, whichever thread the kernel handed it to: a process-directed
    signal goes to any thread that does not block it (torch's and tqdm's threads do not), so blocking it in the
    main thread alone (``pthread_sigmask``) does not hold it. In the main thread the handlers are swapped for one
    that notes the signal, then restored, and each noted signal is raised again; elsewhere (no handler can be set
    there), or over a handler set outside Python, the thread's mask is the best there is."""
    wanted = (signal.SIGINT, signal.SIGTERM)
    # a handler set outside Python (getsignal: None) could not be put back: then the mask too
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, wanted):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, set(wanted))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return
    noted: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in noted:
            signal.raise_signal(s)


def atomic_write(final: Path, write, directory: bool = False) -> None:
    """Call ``write(tmp)`` and move the result to ``final``: a file, or with ``directory`` a directory (``tmp``
    made empty first). ``tmp`` is this process's own sibling of ``final``, never another writer's; on any exception
    it is removed and ``final`` is untouched, so a reader sees the old version or the new one, whole. The one
    atomic write of the repository: files (results.json, metrics.jsonl on resume, the scripts' JSON records) and
    directories (the self-built models, cached artifacts) alike."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    for stale in final.parent.glob(f"{glob.escape(final.name)}.tmp-*"):  # left by a killed writer: it is gone
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
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
