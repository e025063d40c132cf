"""Identity files on disk: atomic writes with the right modes, the reload command really
run, and failures counted without ever stopping the writer."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_from_pem
from sidecar import files
from sidecar.config import FileSink
from sidecar.files import BUNDLE_FILE, KEY_FILE, SVID_FILE, FileWriter
from sidecar.identity.keys import key_from_pem, key_matches
from sidecar.identity.model import Snapshot, WorkloadIdentity
from sidecar.identity.publisher import SnapshotPublisher
from sidecar.metrics import SidecarMetrics
from tests.sidecar.helpers import make_bundle, make_identity, wait_for
from tests.support.pki import ThrowawayCA

WEB = "spiffe://example.org/svc/web"


@pytest.fixture(scope="module")
def root() -> ThrowawayCA:
    return ThrowawayCA.root()


@pytest.fixture(scope="module")
def issuer(root: ThrowawayCA) -> ThrowawayCA:
    return root.intermediate()


def snapshot(root: ThrowawayCA, version: int, *idents: WorkloadIdentity) -> Snapshot:
    return Snapshot.build(
        version, None, make_bundle(root, version=1), {w.entry.id: w for w in idents}
    )


def appender(marker: Path) -> tuple[str, ...]:
    """A reload command that appends one line to `marker` each time it runs."""
    return (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('reload\\n')")


def failures(metrics: SidecarMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "meshtls_sidecar_reload_failures_total", {"spiffe_id": WEB, "reason": reason}
    )
    return value or 0.0


async def test_writes_the_three_files_then_runs_the_reload_command(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    out = tmp_path / "web"
    marker = tmp_path / "marker"
    sink = FileSink(SpiffeId.parse(WEB), out, appender(marker), 10.0)
    writer = FileWriter((sink,))
    web = make_identity(issuer, WEB, "e-web")
    await writer.apply(snapshot(root, 1, web))

    chain = certs_from_pem((out / SVID_FILE).read_bytes())
    assert chain == list(web.svid.chain)
    key = key_from_pem((out / KEY_FILE).read_bytes())
    assert key_matches(key, chain[0])
    assert b"BEGIN PRIVATE KEY" in (out / KEY_FILE).read_bytes()  # PKCS#8
    assert certs_from_pem((out / BUNDLE_FILE).read_bytes()) == [root.cert]
    assert stat.S_IMODE(os.stat(out / KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / SVID_FILE).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out / BUNDLE_FILE).st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == [BUNDLE_FILE, SVID_FILE, KEY_FILE]
    assert marker.read_text() == "reload\n"
    assert writer.reloads == 1


async def test_rewrites_atomically_only_when_something_changed(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    out = tmp_path / "web"
    marker = tmp_path / "marker"
    writer = FileWriter((FileSink(SpiffeId.parse(WEB), out, appender(marker), 10.0),))
    first = make_identity(issuer, WEB, "e-web")
    await writer.apply(snapshot(root, 1, first))
    inode = os.stat(out / SVID_FILE).st_ino
    # Same certificate and bundle again: nothing is written, nothing reloaded.
    await writer.apply(snapshot(root, 2, first))
    assert os.stat(out / SVID_FILE).st_ino == inode
    assert marker.read_text() == "reload\n"
    # A renewal: new files (renamed over the old ones, so a new inode), one more reload.
    second = make_identity(issuer, WEB, "e-web")
    await writer.apply(snapshot(root, 3, second))
    assert os.stat(out / SVID_FILE).st_ino != inode
    assert certs_from_pem((out / SVID_FILE).read_bytes())[0] == second.svid.leaf
    assert marker.read_text() == "reload\nreload\n"


async def test_failing_reload_commands_are_counted_and_survived(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    metrics = SidecarMetrics()
    commands = {
        "exit_status": (sys.executable, "-c", "import sys; sys.exit(3)"),
        "timeout": (sys.executable, "-c", "import time; time.sleep(60)"),
        "start": (str(tmp_path / "no-such-program"),),
    }
    for reason, command in commands.items():
        out = tmp_path / reason
        sink = FileSink(SpiffeId.parse(WEB), out, command, 0.5)
        writer = FileWriter((sink,), metrics)
        await writer.apply(snapshot(root, 1, make_identity(issuer, WEB, "e-web")))
        assert (out / SVID_FILE).exists()  # the files are written regardless
        assert writer.failures == 1
        assert writer.reloads == 0
        assert failures(metrics, reason) == 1


async def test_unwritable_directory_is_counted_and_retried_on_the_next_change(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    metrics = SidecarMetrics()
    writer = FileWriter((FileSink(SpiffeId.parse(WEB), blocker / "web", (), 1.0),), metrics)
    await writer.apply(snapshot(root, 1, make_identity(issuer, WEB, "e-web")))
    assert failures(metrics, "write") == 1
    blocker.unlink()
    blocker.mkdir()
    await writer.apply(snapshot(root, 2, make_identity(issuer, WEB, "e-web")))
    assert (blocker / "web" / SVID_FILE).exists()


async def test_follows_a_subscription(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA
) -> None:
    out = tmp_path / "web"
    writer = FileWriter((FileSink(SpiffeId.parse(WEB), out, (), 1.0),))
    publisher = SnapshotPublisher()
    task = asyncio.create_task(writer.run(publisher.subscribe()))
    try:
        web = make_identity(issuer, WEB, "e-web")
        publisher.publish(snapshot(root, 1, web))
        await wait_for(lambda: (out / SVID_FILE).exists(), what="files written")
        renewed = make_identity(issuer, WEB, "e-web")
        publisher.publish(snapshot(root, 2, renewed))
        await wait_for(
            lambda: certs_from_pem((out / SVID_FILE).read_bytes())[0] == renewed.svid.leaf,
            what="files rewritten",
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert publisher.subscriber_count == 0


async def test_a_cancelled_writer_finishes_the_write_in_progress_before_it_stops(
    tmp_path: Path, root: ThrowawayCA, issuer: ThrowawayCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write runs on a thread, which cancellation cannot stop: the writer's task ends only
    after it, so no file changes once the sidecar has stopped."""
    out = tmp_path / "web"
    writer = FileWriter((FileSink(SpiffeId.parse(WEB), out, (), 10.0),))
    in_write, release = threading.Event(), threading.Event()
    task_done_when_write_ended: list[bool] = []
    real_write_all = files._write_all

    def held_write_all(directory: Path, entries: tuple[tuple[str, bytes, int], ...]) -> None:
        in_write.set()
        release.wait(30)
        real_write_all(directory, entries)
        task_done_when_write_ended.append(task.done())

    monkeypatch.setattr(files, "_write_all", held_write_all)
    task = asyncio.create_task(writer.apply(snapshot(root, 1, make_identity(issuer, WEB, "e"))))
    await wait_for(in_write.is_set, what="the write thread started")
    task.cancel()
    for _ in range(3):  # let the task see its cancellation
        await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task_done_when_write_ended == [False]
    assert (out / SVID_FILE).exists()
