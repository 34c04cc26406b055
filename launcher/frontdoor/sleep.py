"""vLLM's sleep mode, from the front door's side: put an instance to sleep, wake it, and what a
sleeping instance holds.

An instance started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (the endpoints
exist only then) keeps its process, compiled code and CUDA graphs while asleep. Level 1 moves
its weights to host memory and drops the KV cache; level 2 drops both (a wake then reloads the
weights: ``POST /collective_rpc {"method": "reload_weights"}`` and ``/reset_prefix_cache``, as
vLLM's documentation says). What fails here is raised as :class:`SleepError`; the front door
then stops the instance instead (a later request starts it afresh).
"""

from __future__ import annotations

import httpx

from launcher.instances.memory import Footprint

SLEEP_GPU_BYTES = 2**30  # what a sleeping instance keeps on each GPU (its CUDA context, about)
SLEEP_FLAG = "--enable-sleep-mode"
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM serves the sleep endpoints only in dev mode
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a level-2 wake reloads the weights: large models take a while


class SleepError(Exception):
    """The instance could not be put to sleep or woken; the message says what it answered."""


async def _call(client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> httpx.Response:
    try:
        response = await client.request(method, url, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        raise SleepError(f"{method} {url}: {exc!r}") from None
    if response.status_code >= 400:
        raise SleepError(f"{method} {url}: {response.status_code} {response.text[:300]}")
    return response


async def put_to_sleep(client: httpx.AsyncClient, base_url: str, level: int) -> None:
    """``POST /sleep?level=N``, then ``GET /is_sleeping`` must say so."""
    await _call(client, "POST", f"{base_url}/sleep", params={"level": str(level)})
    if not await is_sleeping(client, base_url):
        raise SleepError(f"{base_url} answered /sleep but does not say it is sleeping")


async def wake(client: httpx.AsyncClient, base_url: str, level: int) -> None:
    """``POST /wake_up`` (after level 2 also reload the weights and reset the prefix cache)."""
    await _call(client, "POST", f"{base_url}/wake_up")
    if level == 2:
        await _call(client, "POST", f"{base_url}/collective_rpc", json={"method": "reload_weights"})
        await _call(client, "POST", f"{base_url}/reset_prefix_cache")
    if await is_sleeping(client, base_url):
        raise SleepError(f"{base_url} answered /wake_up but still says it is sleeping")


async def is_sleeping(client: httpx.AsyncClient, base_url: str) -> bool:
    """``GET /is_sleeping``."""
    answer = await _call(client, "GET", f"{base_url}/is_sleeping")
    try:
        return bool(answer.json().get("is_sleeping"))
    except (ValueError, AttributeError):
        raise SleepError(f"{base_url}/is_sleeping answered {answer.text[:200]!r}") from None


def asleep(awake: Footprint, weight_bytes: int, level: int) -> Footprint:
    """What an instance holds once asleep: its CUDA context on each GPU, and on the host what it
    held awake plus (level 1) its weights, moved there from the GPUs."""
    gpu = {uuid: min(SLEEP_GPU_BYTES, used) for uuid, used in awake.gpu_bytes.items()}
    return Footprint(awake.host_bytes + (weight_bytes if level == 1 and awake.gpu_bytes else 0), gpu)
