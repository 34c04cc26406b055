"""The models file is the truth while the launcher runs: its changes are applied, and the API's
changes are written into it.

A change of the file (seen by a file watch on its folder, which also sees a Kubernetes
ConfigMap's atomic symlink swap; polled once a second as well, for filesystems that send no
events), ``SIGHUP`` or ``POST /v2/vllm/models/reload`` reads it again: added profiles are
registered (and checked, and compiled ahead), removed ones stop once idle, changed ones restart
once idle (the rules a ``PUT`` follows). A file that cannot be read changes nothing: the last
good configuration keeps running, and the error (file, line, plain words) is logged, shown in
``GET /v2/vllm/models`` (``file_error``), on the dashboard and in ``/metrics``.

``PUT`` and ``DELETE /v2/vllm/models/NAME`` write the file (:mod:`launcher.frontdoor.models_store`),
then apply it as a reload does: one path for every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import Conflict, NotFound
from launcher.frontdoor.door import FrontDoor
from launcher.frontdoor.model_state import ModelState
from launcher.frontdoor.models_store import NOT_KEPT, ModelsStore, ReadOnly
from launcher.frontdoor.profiles import ModelProfile, ModelsFile, ProfileError, parse_models_file

log = logging.getLogger("launcher.front_door")

POLL_SECONDS = 1.0  # the file is looked at this often even when no watch event comes
SETTLE_SECONDS = 0.2  # a changed file is read again after this, and used once two reads agree
SETTLE_LIMIT = 2.0
RECHECK_IDLE_SECONDS = 10.0  # an invalid model is checked again this often by the poll (at once on SIGHUP/POST)  # a file still changing after this is read as it is then


@dataclass
class Changes:
    """What a reload changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    stopping: dict[str, asyncio.Task[None]] = field(default_factory=dict, repr=False)  # removed ones' stops

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if names]  # fmt: skip
        return "; ".join(parts) or "nothing changed"


class LiveConfig:
    """The models file, its reloads, and the API's changes to it."""

    def __init__(self, door: FrontDoor, store: ModelsStore, text: str | None) -> None:
        self._door = door
        self._store = store
        self._text = text  # the text last applied (None: no file)
        self.file_error: str | None = None
        self._lock = asyncio.Lock()  # one change at a time: a reload, a PUT, a DELETE
        self._checks: dict[int, tuple[asyncio.Task[Any], Any]] = {}  # model uid -> its last check, of which profile

    @property
    def path(self) -> str:
        """The models file (empty: none)."""
        return self._store.path

    def describe(self) -> dict[str, Any]:
        """What ``GET /v2/vllm/models`` says of the file."""
        return {"models_file": self._store.path or None, "file_error": self.file_error,
                **({} if self._store.kept else {"warning": NOT_KEPT})}  # fmt: skip

    # ------------------------------------------------------------------ reloading

    async def reload(self, *, why: str) -> Changes:
        """Read the file again and apply it if it changed; :class:`ProfileError` if it cannot be read.

        Invalid models are checked again either way (a folder may have appeared)."""
        async with self._lock:
            return await self._reload(why)

    async def _stable_text(self) -> str | None:
        """The file's text once two reads ``SETTLE_SECONDS`` apart agree: an editor or ``cat >``
        writing in place is never read half-written (an empty file would remove every model)."""
        text = self._store.read_text()
        for _ in range(int(SETTLE_LIMIT / SETTLE_SECONDS)):
            if text == self._text:
                return text
            await asyncio.sleep(SETTLE_SECONDS)
            again = self._store.read_text()
            if again == text:
                return text
            text = again
        return text

    async def _reload(self, why: str) -> Changes:
        try:
            text = await self._stable_text()
            if text == self._text:
                if self.file_error is not None:
                    log.info("models file %s is as it was: the running models are its", self._store.path)
                    self._set_error(None)  # put back as it was: the running configuration is the file's
                self._check_invalid(every=why != "changed")  # the 1 s poll: not every second
                return Changes()
            if text is None:
                raise ProfileError(f"the models file {self._store.path} is gone; the models it listed keep running "
                                   "(an empty file removes them)")  # fmt: skip
            models = parse_models_file(text, source=f"models file {self._store.path}")
            changes = self._apply(models)
        except ProfileError as exc:
            if str(exc) != self.file_error:
                log.error("models file not reloaded (%s), the running models stay: %s", why, exc)
                self._door.metrics.reloads.labels(outcome="error").inc()
            self._set_error(str(exc))
            raise
        self._text = text
        if self.file_error is not None:
            log.info("models file %s can be read again", self._store.path)
        self._set_error(None)
        self._check_invalid()
        self._door.metrics.reloads.labels(outcome="applied").inc()
        log.info("models file reloaded (%s): %s", why, changes)
        return changes

    def _check_invalid(self, *, every: bool = True) -> None:
        """Check the invalid models again: a folder that finished syncing makes its model servable
        (``every``: all of them; else those not checked for ``RECHECK_IDLE_SECONDS``)."""
        now = time.monotonic()
        for state in self._door.states():
            if state.invalid is not None and (every or now - state.checked_at >= RECHECK_IDLE_SECONDS):
                self._check_soon(state)

    def _set_error(self, error: str | None) -> None:
        self.file_error = error
        self._door.metrics.file_error.set(0 if error is None else 1)

    def _apply(self, models: ModelsFile) -> Changes:
        """Make the door's profiles those of ``models``."""
        door = self._door
        door.default_idle_timeout = models.idle_timeout
        current = {state.name: state for state in door.states()}
        changes = Changes(removed=[name for name in current if name not in models.models])
        for name in changes.removed:
            changes.stopping[name] = door.spawn(door.stop_removed(door.forget_profile(name)), f"remove-{name}")
        pending = {name: profile for name, profile in models.models.items()
                   if name not in current or current[name].profile != profile}  # fmt: skip
        # Aliases may move between profiles, even swap: the changed ones let go of theirs first (the
        # file's names are known to be unique, so every one then fits).
        for name in pending:
            if name in current:
                door.drop_aliases(name)
        for name, profile in pending.items():
            state, created = door.put_profile(name, profile, compile_ahead=False)  # compiled once checked
            (changes.added if created else changes.changed).append(name)
            self._check_soon(state)
        return changes

    def _check_soon(self, state: ModelState) -> None:
        """Check the model's profile in the background: one check per model and profile at a time."""
        running = self._checks.get(state.uid)
        if running is not None and not running[0].done() and running[1] is state.profile:
            return
        task = asyncio.ensure_future(self._door.check_runnable(state))
        self._checks[state.uid] = (task, state.profile)

    async def watch_forever(self) -> None:
        """Reload when the file changes: a watch on its folder, and a look every second."""
        if not self._store.path or not self._door.settings.watch_models_file:
            return
        watcher = asyncio.ensure_future(self._watch_events())
        try:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                with contextlib.suppress(ProfileError):
                    await self.reload(why="changed")
        finally:
            watcher.cancel()

    async def _watch_events(self) -> None:
        """Reload as soon as the folder reports a change (inotify); the poll remains if this cannot run."""
        try:
            import watchfiles
        except ImportError:  # uvicorn[standard] brings it; without it, the poll alone
            return
        folder = os.path.dirname(os.path.abspath(self._store.path))
        try:
            async for _ in watchfiles.awatch(folder, recursive=False, debounce=100, step=50):
                with contextlib.suppress(ProfileError):
                    await self.reload(why="changed")
        except (OSError, RuntimeError) as exc:  # the folder is gone or cannot be watched: the poll goes on
            log.debug("watching %s for changes failed (%s): polling only", folder, exc)

    # ------------------------------------------------------------------ the API's changes

    async def put(self, name: str, profile: ModelProfile) -> tuple[ModelState, bool]:
        """Add or replace a profile, written into the file first (:class:`Conflict` if it cannot be)."""
        async with self._lock:
            self._door.check_labels(name, profile)
            if not self._store.kept:
                return self._door.put_profile(name, profile)
            created = self._door.resolve(name) is None
            await self._write(lambda: self._store.put(name, profile))
            state = self._door.resolve(name)
            assert state is not None
            return state, created

    async def delete(self, name: str) -> None:
        """Remove a profile, from the file first; return once its instance is gone."""
        async with self._lock:
            if name not in {state.name for state in self._door.states()}:
                raise NotFound(f"model {name!r} not found")
            if not self._store.kept:
                stopping = self._door.spawn(self._door.stop_removed(self._door.forget_profile(name)), f"remove-{name}")
            else:
                stopping = (await self._write(lambda: self._store.remove(name))).stopping[name]
        await asyncio.wait({stopping})

    async def _write(self, change: Any) -> Changes:
        """Write a change into the file, then apply the whole file (a hand edit made meanwhile too)."""
        try:
            await self._reload("before an API change")  # the file as it is now, not as last seen
        except ProfileError as exc:
            raise Conflict(f"the models file has an error, so it is not changed: fix it first ({exc})") from None
        try:
            text = change()
        except ReadOnly as exc:
            raise Conflict(str(exc)) from None
        except ProfileError as exc:
            raise Conflict(f"the change would leave a models file that cannot be read: {exc}") from None
        models = parse_models_file(text, source=f"models file {self._store.path}")
        self._text = text
        changes = self._apply(models)
        log.info("models file %s written: %s", self._store.path, changes)
        return changes
