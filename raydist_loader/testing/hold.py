"""Aside (testing): a cross-process hold on manifest reads, for deterministic races between the ranks of an engine.

``faulty+<scheme>://...?hold=DIR`` (see :mod:`.faulty`) routes every read of a key ending in ``manifest.json``
(the current pointer and the versions' manifests; ``hold_key=SUB``: of a key containing SUB instead, e.g. the
chunks a Ray actor reads) through :class:`ManifestHold`: the first process that reads one takes the ticket
(``DIR/ticket``, created exclusively) and is never held; every other process is held at its first such read:
it writes ``DIR/held-<pid>`` and waits until ``DIR/release`` exists. A test waits for a
``held-*`` file, publishes a new version, then creates ``release``: the held rank then reads the store as it is
after that publish. Emptying DIR starts a new round (an engine's reload). No sleeps in the test: the held process
polls a file, and gives up (raising) after ``timeout_s``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ..errors import BackendError

TICKET, RELEASE, HELD = "ticket", "release", "held-"


class ManifestHold:
    """The hold of one directory (see the module)."""

    def __init__(self, directory: str, key: str | None = None, timeout_s: float = 300.0):
        self.dir, self.key, self.timeout_s = Path(directory), key, timeout_s

    def before_read(self, key: str) -> None:
        matches = key.endswith("manifest.json") if self.key is None else self.key in key
        if not matches or not self.dir.is_dir():
            return
        pid = str(os.getpid())
        if self._holds_ticket(pid) or (self.dir / f"passed-{pid}").exists():
            return
        (self.dir / f"{HELD}{pid}").write_text(key)
        deadline = time.monotonic() + self.timeout_s
        while not (self.dir / RELEASE).exists():
            if time.monotonic() > deadline:
                raise BackendError(f"hold: {self.dir / RELEASE} did not appear within {self.timeout_s:.0f} s")
            time.sleep(0.01)
        (self.dir / f"passed-{pid}").write_text(key)

    def _holds_ticket(self, pid: str) -> bool:
        try:
            fd = os.open(self.dir / TICKET, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return (self.dir / TICKET).read_text() == pid
        with os.fdopen(fd, "w") as f:
            f.write(pid)
        return True


def held(directory: str | Path) -> list[str]:
    """The pids held now (or once) in ``directory``."""
    return [p.name[len(HELD):] for p in Path(directory).glob(f"{HELD}*")]


def release(directory: str | Path) -> None:
    (Path(directory) / RELEASE).write_text("")


def new_round(directory: str | Path) -> None:
    """Empty ``directory``: the next manifest read takes the ticket again, the others are held again."""
    for p in Path(directory).iterdir():
        p.unlink()


class PublishWhenHeld:
    """A race, in a thread of the test (or of an engine test's harness): ``race = {"hold": DIR, "publish": {"ckpt",
    "url", "model", "max_tp"}}``: start a new round of DIR, wait until some process is held there, publish the
    checkpoint (a new version), then release the held process. :meth:`done` joins and says what happened."""

    def __init__(self, race: dict, timeout_s: float = 300.0):
        self.race, self.timeout_s = race, timeout_s
        self.out: dict = {"held": [], "published": None, "error": None}
        new_round(race["hold"])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from .. import publish

        deadline = time.monotonic() + self.timeout_s
        try:
            while not held(self.race["hold"]):
                if time.monotonic() > deadline:
                    raise TimeoutError("no process was held at a manifest read")
                time.sleep(0.01)
            self.out["held"] = held(self.race["hold"])
            p = self.race["publish"]
            self.out["published"] = publish(p["ckpt"], p["url"], p["model"], max_tp=p["max_tp"]).version
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.out["error"] = f"{type(e).__name__}: {e}"
        finally:
            release(self.race["hold"])

    def done(self) -> dict:
        self.thread.join(timeout=self.timeout_s + 30)
        return self.out
