"""Compile ahead: a front-door model's compiled artifact is made before its first request.

In vLLM's default mode an instance compiles its model with torch.compile, unless vLLM's cache
(``$VLLM_CACHE_ROOT/torch_compile_cache``) already holds the result; then it loads it in well
under a second (forkserver/compile_cache_compat.py). So the first request for a model on a new
machine would wait for a compile. When a profile is registered (models file or ``PUT``) or asked
for (``POST /v2/vllm/models/{name}/warm``), the front door starts a throwaway instance of it:

- one at a time, at the lowest CPU priority (``nice`` 19, its helpers and compilers included),
  listening on loopback only, annotated ``launcher.front-door/compile-ahead``;
- stopped as soon as its engine is up (the artifact is saved by then), or at a deadline;
- given up at once when serving needs its slot or its CPU: a real start of the same model (which
  compiles or loads by itself), or room for any model.

When the artifact is already cached the run only loads it (about 1 s here), so nothing is
predicted: running it is how the front door finds out. A model's ``compiled`` is ``false``
until a throwaway or a real instance of its current profile got its engine up, ``compiling``
while a throwaway runs, ``true`` after; eager profiles (``--enforce-eager``) have nothing to
compile and are ``true`` at once. vLLM writes each artifact under a temporary name and renames
it, so two instances compiling one model at once cannot corrupt the cache (tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shlex
import time
from collections.abc import Callable
from typing import Literal

from launcher.errors import LauncherError, NotFound, TooManyInstances
from launcher.frontdoor.profiles import ModelProfile
from launcher.instances.config import VllmConfig
from launcher.instances.manager import InstanceManager

log = logging.getLogger("launcher.frontdoor.compile_ahead")

COMPILE_ANNOTATION = "launcher.front-door/compile-ahead"  # on every throwaway instance
COMPILE_NICE = 19
RETRY_SECONDS = 2.0  # how soon a compile waiting for a free slot looks again
Compiled = bool | Literal["compiling"]


def needs_compile(profile: ModelProfile) -> bool:
    """False for profiles vLLM runs eagerly (``--enforce-eager``): nothing to compile."""
    try:
        tokens = shlex.split(profile.options)
    except ValueError:
        return True
    return not any(token == "--enforce-eager" or token.startswith("--enforce-eager=") for token in tokens)


def throwaway_config(name: str, profile: ModelProfile) -> VllmConfig:
    """The profile's instance (on loopback unless the profile sets ``--host``), annotated as a throwaway."""
    config = profile.instance_config(name)
    return config.model_copy(update={"annotations": {**(config.annotations or {}), COMPILE_ANNOTATION: name}})


def _instance_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:90] or "model"
    return f"compile-{slug}-{secrets.token_hex(3)}"


class _Job:
    """One model to compile, and the profile it was asked for."""

    def __init__(self, name: str, profile: ModelProfile) -> None:
        self.name = name
        self.profile = profile
        self.task: asyncio.Task[None] | None = None


class CompileAhead:
    """A queue of models to compile, worked one at a time by :meth:`run_forever`."""

    def __init__(
        self,
        manager: InstanceManager,
        *,
        timeout: float,
        on_done: Callable[[str, ModelProfile, Compiled, str | None], None],
        serving_waits: Callable[[], bool] = lambda: False,
    ) -> None:
        """``on_done(name, profile, compiled, error)`` reports every change of a model's state;
        while ``serving_waits()`` (a start waits for room) no throwaway is started."""
        self._manager = manager
        self._timeout = timeout
        self._on_done = on_done
        self._serving_waits = serving_waits
        self._queue: dict[str, _Job] = {}
        self._current: _Job | None = None
        self._wake = asyncio.Event()

    def request(self, name: str, profile: ModelProfile) -> None:
        """Compile ``profile`` of model ``name``; later asks replace earlier ones."""
        if self._current is not None and self._current.name == name:
            if self._current.profile == profile:
                return  # under way already
            self.cancel(name)
        self._queue[name] = _Job(name, profile)
        self._wake.set()

    def forget(self, name: str) -> None:
        """The model was deleted, or a real start of it took over: drop it from the queue, stop its run."""
        self._queue.pop(name, None)
        self.cancel(name)

    def cancel(self, name: str | None = None) -> asyncio.Task[None] | None:
        """Stop the running throwaway (of model ``name``, or any); its task, to await its clean-up."""
        job = self._current
        if job is None or job.task is None or (name is not None and job.name != name):
            return None
        job.task.cancel()
        return job.task

    def yield_room(self) -> asyncio.Task[None] | None:
        """Serving needs a slot: stop the running throwaway and queue it again for later."""
        job = self._current
        task = self.cancel()
        if job is not None and task is not None:
            self._queue.setdefault(job.name, _Job(job.name, job.profile))
        return task

    def pending(self, name: str) -> bool:
        """True if model ``name`` is queued or compiling."""
        return name in self._queue or (self._current is not None and self._current.name == name)

    async def run_forever(self) -> None:
        """Work the queue, one model at a time, until cancelled."""
        while True:
            while not self._queue or self._serving_waits():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RETRY_SECONDS)
            name = next(iter(self._queue))
            job = self._queue.pop(name)
            self._current = job
            job.task = asyncio.create_task(self._compile(job), name=f"compile-{name}")
            try:
                await asyncio.wait({job.task})  # returns also when the job is cancelled
            except asyncio.CancelledError:  # shutdown: the throwaway goes too
                job.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job.task
                raise
            finally:
                self._current = None

    async def _compile(self, job: _Job) -> None:
        instance_id: str | None = None
        self._on_done(job.name, job.profile, "compiling", None)
        outcome: Compiled = False
        error: str | None = None
        started = time.monotonic()
        try:
            config = throwaway_config(job.name, job.profile)
            while instance_id is None:
                try:
                    record = await self._manager.create(
                        config, _instance_id(job.name), received_at=time.time(), nice=COMPILE_NICE
                    )
                    instance_id = record.instance_id
                except TooManyInstances:
                    await asyncio.sleep(RETRY_SECONDS)  # the launcher is full: wait, never evict for this
            record = await asyncio.wait_for(self._manager.wait_settled(instance_id), self._timeout)
            if record.ready:
                outcome = True
                log.info("model %s compiled ahead in %.1fs", job.name, time.monotonic() - started)
            else:
                error = (
                    f"compiling model {job.name!r} ahead failed: its instance {instance_id} exited with code "
                    f"{record.exit_code}. Last lines of its log:\n{self._manager.log_tail(record)}"
                )
        except TimeoutError:
            error = f"compiling model {job.name!r} ahead took longer than {self._timeout:g}s: given up"
        except LauncherError as exc:
            error = f"compiling model {job.name!r} ahead failed: {exc}"
        finally:
            if instance_id is not None:
                await asyncio.shield(self._delete(instance_id))
            if error is not None:
                log.warning("%s", error)
            self._on_done(job.name, job.profile, outcome, error)

    async def _delete(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound, LauncherError):
            await self._manager.delete(instance_id)
