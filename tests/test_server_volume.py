"""check_volume with replicas started together on a new job store: the one whose volume id went into the store
writes the output directory's marker a moment later; the others wait for it instead of refusing the volume."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")

from gen.server import app as app_module  # noqa: E402
from gen.types import GenError  # noqa: E402


class FirstWinsStore:
    """The job store's volume record: the first id offered is kept (new=True once), later callers get it back."""

    def __init__(self):
        self.id, self.lock = None, threading.Lock()

    def volume(self, offered: str):
        with self.lock:
            if self.id is None:
                self.id = offered
                return offered, True
            return self.id, False


def test_a_replica_waits_for_the_marker_another_replica_is_writing(tmp_path, monkeypatch):
    store = FirstWinsStore()
    store.volume("a" * 32)  # replica A put its id in the store and is about to write the marker
    writer = threading.Timer(0.3, lambda: (tmp_path / app_module.VOLUME_MARKER).write_text("a" * 32 + "\n"))
    writer.start()
    app_module.check_volume(store, tmp_path)  # replica B: no marker yet, the store's id is not its own
    writer.join()


def test_a_replica_on_an_empty_folder_of_its_own_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "MARKER_WAIT_S", 0.3)
    store = FirstWinsStore()
    store.volume("a" * 32)
    start = time.monotonic()
    with pytest.raises(GenError, match="no .gen-volume marker"):
        app_module.check_volume(store, tmp_path)
    assert time.monotonic() - start >= 0.3
