"""Instance lifecycle: create, stop, delete and list, on top of the forkserver."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

from forkserver import protocol
from forkserver.workload import tokens_name_flag
from launcher.errors import BadRequest, Conflict, InternalError, LauncherError, NotFound, ServiceUnavailable
from launcher.forkserver_client import ForkserverError, ForkserverGone
from launcher.forkserver_process import ForkserverSupervisor
from launcher.models import VllmConfig, check_instance_id
from launcher.settings import Settings
from launcher.state import InstanceRecord, Status

log = logging.getLogger("launcher.manager")


def _http_error(exc: ForkserverError) -> LauncherError:
    if isinstance(exc, ForkserverGone):
        return ServiceUnavailable(str(exc))
    if exc.kind == protocol.KIND_INVALID:
        return BadRequest(str(exc))
    if exc.kind == protocol.KIND_CONFLICT:
        return Conflict(str(exc))
    if exc.kind == protocol.KIND_NOT_FOUND:
        return NotFound(str(exc))
    return InternalError(f"failed to create vLLM instance: {exc}")


class InstanceManager:
    """The launcher's instances. All state changes go through here, on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.log_dir = settings.resolved_log_dir()
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self._records: dict[str, InstanceRecord] = {}
        self._stopped: dict[str, asyncio.Event] = {}
        self._creating: set[str] = set()
        self._deleting: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._early_exits: dict[str, dict[str, Any]] = {}
        self.forkserver = ForkserverSupervisor(settings, on_event=self._on_event, on_lost=self._on_forkserver_lost)

    # ------------------------------------------------------------------ lifecycle of the manager

    def start(self) -> None:
        """Start the forkserver (in the background)."""
        self.forkserver.start()

    async def shutdown(self) -> None:
        """Stop every instance and the forkserver; remove the instances' log files."""
        await self.forkserver.stop(self._settings.stop_timeout)
        for record in list(self._records.values()):
            record.mark_stopped(exit_code=None, stopped_at=None, reason="launcher shut down")
            self._remove_log(record.log_path)
        self._records.clear()

    # ------------------------------------------------------------------ queries

    def get(self, instance_id: str) -> InstanceRecord:
        """The record of ``instance_id`` or a 404."""
        record = self._records.get(instance_id)
        if record is None:
            raise NotFound(f"instance {instance_id!r} not found")
        return record

    def all(self) -> list[InstanceRecord]:
        """Every instance, oldest first."""
        return list(self._records.values())

    # ------------------------------------------------------------------ create

    async def create(self, config: VllmConfig, instance_id: str | None, *, received_at: float) -> InstanceRecord:
        """Fork a new instance; 409 if the id is taken, 400 if vLLM rejects the options."""
        instance_id = check_instance_id(instance_id) if instance_id is not None else str(uuid.uuid4())
        if instance_id in self._records or instance_id in self._creating:
            raise Conflict(f"instance {instance_id!r} already exists")
        argv = config.argv()
        if not tokens_name_flag(argv, "--port"):
            raise BadRequest("options must set the instance's port: add --port PORT")
        env = dict(config.env_vars or {})
        log_path = os.path.join(self.log_dir, f"{instance_id}.log")
        self._creating.add(instance_id)
        try:
            client = await self.forkserver.client()
            reply = await client.request(
                protocol.OP_SPAWN,
                instance_id=instance_id,
                argv=argv,
                env=env,
                log_path=log_path,
                received_at=received_at,
            )
        except ForkserverError as exc:
            raise _http_error(exc) from None
        finally:
            self._creating.discard(instance_id)
        record = InstanceRecord(
            instance_id=instance_id,
            config=config,
            log_path=log_path,
            pid=int(reply["pid"]),
            port=int(reply["port"]),
            model=str(reply["model"]),
            received_at=received_at,
            created_at=float(reply["forked_at"]),
        )
        self._records[instance_id] = record
        self._stopped[instance_id] = asyncio.Event()
        early = self._early_exits.pop(instance_id, None)
        if early is not None:
            self._on_event(early)
        log.info("created instance %s (pid %s, port %s)", instance_id, record.pid, record.port)
        return record

    # ------------------------------------------------------------------ delete

    async def delete(self, instance_id: str) -> dict[str, Any]:
        """Stop ``instance_id`` (if running), wait until no process of it is left, forget it."""
        task = self._deleting.get(instance_id)
        if task is None:
            record = self.get(instance_id)
            task = asyncio.create_task(self._delete(record), name=f"delete-{instance_id}")
            self._deleting[instance_id] = task
        # Shielded: a client that hangs up mid-DELETE does not leave a half-deleted instance.
        return await asyncio.shield(task)

    async def delete_all(self) -> list[dict[str, Any]]:
        """Delete every instance concurrently."""
        results = await asyncio.gather(
            *(self.delete(instance_id) for instance_id in list(self._records)), return_exceptions=True
        )
        return [result for result in results if isinstance(result, dict)]

    async def _delete(self, record: InstanceRecord) -> dict[str, Any]:
        instance_id = record.instance_id
        try:
            if record.status is Status.RUNNING:
                try:
                    client = await self.forkserver.client()
                    await client.request(
                        protocol.OP_STOP, instance_id=instance_id, grace_seconds=self._settings.stop_timeout
                    )
                except ForkserverGone:
                    pass  # the forkserver is gone, and its instances with it; _on_forkserver_lost marks them
                await self._stopped[instance_id].wait()
            if self.forkserver.ready:
                with contextlib.suppress(ForkserverError):
                    client = await self.forkserver.client()
                    await client.request(protocol.OP_FORGET, instance_id=instance_id)
            await asyncio.to_thread(self._remove_log, record.log_path)
            self._records.pop(instance_id, None)
            self._stopped.pop(instance_id, None)
            log.info("deleted instance %s", instance_id)
            return {"status": "terminated", "instance_id": instance_id}
        finally:
            self._deleting.pop(instance_id, None)

    @staticmethod
    def _remove_log(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # ------------------------------------------------------------------ events from the forkserver

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("event") != protocol.EVENT_EXITED:
            return
        instance_id = str(message.get("instance_id"))
        record = self._records.get(instance_id)
        if record is None:
            if instance_id in self._creating:
                self._early_exits[instance_id] = message  # exited before create() recorded it
            return
        exit_code = message.get("exit_code")
        record.mark_stopped(
            exit_code=int(exit_code) if isinstance(exit_code, int) else None,
            stopped_at=message.get("stopped_at") or time.time(),
        )
        self._stopped[instance_id].set()
        log.info("instance %s stopped: exit code %s", instance_id, exit_code)

    async def _on_forkserver_lost(self, reason: str) -> None:
        for record in self._records.values():
            if record.mark_stopped(exit_code=None, stopped_at=None, reason=reason):
                self._stopped[record.instance_id].set()
