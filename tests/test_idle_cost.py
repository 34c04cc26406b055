"""The launcher's own idle cost: what it reads of /proc while its instances sit idle.

The forkserver's /dev/shm scan and the API's memory sampler, each driven by a simulated clock
against real processes (a child in its own session, as an instance is); /proc reads are counted
by a spy that calls the real reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from forkserver import leftovers
from forkserver.instances import SHM_RELOOK_SECONDS, Instance, InstanceTable

# Maps each path it reads on stdin and keeps it mapped; says so on stdout.
MAPPER = """
import mmap, sys
kept = []
for line in sys.stdin:
    file = open(line.strip(), "r+b")
    kept.append((file, mmap.mmap(file.fileno(), 0)))
    print("mapped", flush=True)
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _script(source: str) -> Iterator[subprocess.Popen[str]]:
    """A Python child running ``source``, talked to over its stdin and stdout; killed after the test."""
    child = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    yield child
    child.kill()
    child.wait()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def mapper() -> Iterator[subprocess.Popen[str]]:
    yield from _script(MAPPER)


def _map(child: subprocess.Popen[str], path: Path) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(f"{path}\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "mapped"


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private /dev/shm: other programs' segments on this machine stay out of the counts."""
    directory = tmp_path / "shm"
    directory.mkdir()
    monkeypatch.setattr(leftovers, "SHM_DIR", str(directory))
    return directory


@pytest.fixture
def maps_read(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Each pass over processes' maps and fds, with the pids it read (the real reader is called)."""
    passes: list[list[int]] = []
    real = leftovers.mapped_segments

    def counting(pids: list[int], kinds: tuple[str, ...] | None = None) -> set[str]:
        passes.append(list(pids))
        return real(pids, kinds)

    monkeypatch.setattr(leftovers, "mapped_segments", counting)
    return passes


def _table(child: subprocess.Popen[str], tmp_path: Path, clock: Clock) -> tuple[InstanceTable, Instance]:
    table = InstanceTable(on_finished=lambda instance: None, clock=clock)
    instance = Instance(instance_id="idle", pid=child.pid, model="m", port=1, log_path="", tmpdir=str(tmp_path / "t"),
                        forked_at=0.0, shm_before=frozenset(leftovers.listing().items()))  # fmt: skip
    table.add(instance)
    return table, instance


def _run(table: InstanceTable, clock: Clock, seconds: int, every: Callable[[], None] | None = None) -> None:
    for _ in range(seconds):
        clock.now += 1.0
        table.tick()
        if every is not None:
            every()


def test_a_segment_nobody_claims_is_looked_at_less_and_less(
    shm: Path, maps_read: list[list[int]], mapper: subprocess.Popen[str], tmp_path: Path
) -> None:
    """Another program's file in /dev/shm, made after the instance: looked at when it appears,
    then once a minute, not each second (it was: 600 passes over the instance's maps in 600 s)."""
    clock = Clock()
    table, instance = _table(mapper, tmp_path, clock)
    _run(table, clock, 5)
    assert maps_read == []  # nothing new in /dev/shm: no /proc read
    (shm / "theirs").write_bytes(b"\0" * 4096)
    _run(table, clock, 600)
    assert 2 <= len(maps_read) <= 11, len(maps_read)
    assert instance.shm_segments == set()


def test_a_segment_the_instance_maps_later_is_still_its_own(
    shm: Path, maps_read: list[list[int]], mapper: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A segment that appears unmapped and that the instance maps later is claimed at a later look
    (within SHM_RELOOK_SECONDS), and once claimed costs no more reads."""
    clock = Clock()
    table, instance = _table(mapper, tmp_path, clock)
    segment = shm / "psm_later"
    segment.write_bytes(b"\0" * 4096)
    _run(table, clock, 300)
    assert instance.shm_segments == set()
    _map(mapper, segment)
    _run(table, clock, int(SHM_RELOOK_SECONDS) + 1)
    assert instance.shm_segments == {("psm_later", segment.stat().st_ino)}
    reads = len(maps_read)
    _run(table, clock, 300)
    assert len(maps_read) == reads


def test_a_segment_the_instance_makes_is_claimed_at_the_next_scan(
    shm: Path, maps_read: list[list[int]], mapper: subprocess.Popen[str], tmp_path: Path
) -> None:
    clock = Clock()
    table, instance = _table(mapper, tmp_path, clock)
    segment = shm / "psm_made"
    segment.write_bytes(b"\0" * 4096)
    _map(mapper, segment)
    _run(table, clock, 1)
    assert instance.shm_segments == {("psm_made", segment.stat().st_ino)}
    assert len(maps_read) == 1


# Grows its memory (``grow MiB``, pages written) or works (``spin seconds`` of CPU) when told.
WORKER = """
import sys, time
kept = []
for line in sys.stdin:
    command, amount = line.split()
    if command == "grow":
        kept.append(b"\\1" * (int(amount) << 20))
    else:
        end = time.process_time() + float(amount)
        while time.process_time() < end:
            pass
    print("done", flush=True)
"""


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[str]]:
    yield from _script(WORKER)


def _tell(child: subprocess.Popen[str], command: str) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(command + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "done"


def test_the_memory_sampler_backs_off_while_nothing_changes_and_reads_again_at_a_change(
    worker: subprocess.Popen[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager's sampler, on a real process: PSS (smaps_rollup, the costly read) is read every
    look while the instance starts; once it is ready and nothing moves, less and less often (it
    was: every 2 s); at once when its RSS moves, when it works a second of CPU, or when an
    instance starts or stops; and every 2 s again for a while after a change."""
    from launcher.instances import memory
    from launcher.instances.config import VllmConfig
    from launcher.instances.manager import MEMORY_SAMPLE_SECONDS, InstanceManager
    from launcher.instances.state import InstanceRecord
    from launcher.settings import Settings

    reads: list[list[int]] = []
    real = memory.pss_bytes

    def counting(pids: Iterable[int]) -> int:
        reads.append(list(pids))
        return real(reads[-1])

    monkeypatch.setattr(memory, "pss_bytes", counting)
    clock = Clock()
    manager = InstanceManager(Settings(log_dir=str(tmp_path / "logs"), runtime_dir=str(tmp_path / "run")))
    manager._schedule = memory.SampleSchedule(clock)  # simulated time
    record = InstanceRecord(instance_id="idle", config=VllmConfig(options="--model m"), log_path="", pid=worker.pid,
                            port=1, model="m", received_at=0.0)  # fmt: skip

    def looks(count: int) -> int:
        """The sampler's next ``count`` looks, ``MEMORY_SAMPLE_SECONDS`` apart: how many read PSS."""
        before = len(reads)
        for _ in range(count):
            clock.now += MEMORY_SAMPLE_SECONDS
            sampled = manager._measure([record])  # one look, as the sampler's loop takes it
            if "idle" in sampled:
                record.memory = sampled["idle"]
        return len(reads) - before

    # Its own memory first: PSS of shared libraries wobbles as other processes come and go (a busy
    # machine), by more than the 2 % "steady" band of a bare Python process; not of 64 MiB more.
    _tell(worker, "grow 64")
    assert looks(5) == 5  # starting: every look
    record.mark_ready()
    assert looks(150) <= 12  # 300 s at rest
    held = record.memory
    assert held is not None

    _tell(worker, "grow 64")
    assert looks(1) == 1  # its RSS moved
    assert record.memory is not None and record.memory.host_bytes >= held.host_bytes + 48 * 2**20
    assert looks(1) == 1  # just after a change: every look again

    looks(150)
    _tell(worker, "spin 1.2")
    assert looks(1) == 1  # it worked: pages it shared may have been copied

    looks(150)
    manager._schedule.changed()  # what a start, a ready or a stop calls
    assert looks(1) == 1
    assert looks(1) == 1


def test_a_change_while_an_instance_is_read_is_not_lost(worker: subprocess.Popen[str]) -> None:
    """The sampler reads in a worker thread while the event loop may note a change (a start, a
    stop): the read that was under way does not count as after the change."""
    from launcher.instances import memory

    clock = Clock()
    schedule = memory.SampleSchedule(clock)
    footprint = memory.Footprint(memory.pss_bytes([worker.pid]))
    assert schedule.due("idle", starting=False)
    schedule.sampled("idle", [worker.pid], footprint)
    clock.now += memory.FAST_SAMPLE_SECONDS
    assert schedule.due("idle", starting=False)
    schedule.changed()  # meanwhile, on the event loop
    schedule.sampled("idle", [worker.pid], footprint)
    assert schedule.due("idle", starting=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file takes root")
def test_another_users_segment_is_never_looked_at(
    shm: Path, maps_read: list[list[int]], mapper: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A segment of another user can never be removed, so who maps it does not matter: no /proc read."""
    clock = Clock()
    table, _ = _table(mapper, tmp_path, clock)
    theirs = shm / "psm_theirs"
    theirs.write_bytes(b"\0" * 4096)
    os.chown(theirs, os.getuid() + 4242, -1)
    _run(table, clock, 120)
    assert maps_read == []
