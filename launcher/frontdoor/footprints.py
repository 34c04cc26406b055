"""What a model is expected to hold before it starts: declared, remembered, or estimated.

In that order: the profile's own ``memory`` / ``gpu_memory``; else the peak measured the last
time this profile ran (kept in a small JSON file, across launcher restarts); else an estimate
from the model's weight files, the KV-cache setting and an overhead learnt from the instances
already run (a fixed guess until one has). On a GPU, vLLM takes its
``--gpu-memory-utilization`` share of each device it is given, whatever the model: that share
is the GPU estimate unless ``gpu_memory`` says otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.frontdoor.profiles import ModelProfile
from launcher.instances.memory import Footprint, gpu_utilization, option_value, parse_size

log = logging.getLogger("launcher.front_door")

DEFAULT_OVERHEAD = 512 * 2**20  # host bytes beyond weights and KV cache, until one instance is measured
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class Expected:
    """A model's expected footprint and where it came from."""

    footprint: Footprint
    source: str  # "declared", "measured" or "estimated"

    def to_json(self) -> dict[str, Any]:
        return {**self.footprint.to_json(), "source": self.source}


def profile_key(name: str, profile: ModelProfile) -> str:
    """A profile's identity for remembered peaks: a changed profile starts afresh."""
    text = json.dumps([name, profile.options, profile.env_vars or {}, profile.gpu_uuids or []], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_path(options: str) -> Path | None:
    """The local directory (or file) of the model that options name, if they name one."""
    model = option_value(options, "--model")
    if model is None:
        with contextlib.suppress(ValueError):
            first = options.split()[0] if options.split() else ""
            model = first if first and not first.startswith("-") else None
    if model is None or not model.startswith(("/", "./", "../", "~")):
        return None
    return Path(os.path.expanduser(model))


_WEIGHTS: dict[Path, tuple[int, int]] = {}  # path -> (its mtime, the weights' size): one stat, not a listing


def weight_bytes(path: Path | None) -> int:
    """The size of the model's weight files (0 if they are not on this node).

    Asked on the event loop for every room plan and models listing: the directory is listed
    again only when its modification time changes (a model copied in later is seen).
    """
    if path is None:
        return 0
    try:
        stat = path.stat()
        known = _WEIGHTS.get(path)
        if known is not None and known[0] == stat.st_mtime_ns:
            return known[1]
        if path.is_file():
            size = stat.st_size
        else:
            size = sum(entry.stat().st_size for entry in path.iterdir() if entry.name.endswith(WEIGHT_SUFFIXES))
    except OSError:
        return 0
    _WEIGHTS[path] = (stat.st_mtime_ns, size)
    return size


def kv_cache_bytes(profile: ModelProfile) -> int:
    """Host bytes of the KV cache on CPU: ``--kv-cache-memory-bytes``, else ``VLLM_CPU_KVCACHE_SPACE`` GiB."""
    given = option_value(profile.options, "--kv-cache-memory-bytes")
    if given is not None:
        with contextlib.suppress(ValueError):
            return parse_size(given)
    space = (profile.env_vars or {}).get("VLLM_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if space:
        with contextlib.suppress(ValueError):
            return int(float(space) * 2**30)
    return 0


def _usable(entry: object) -> bool:
    """Whether a footprints-file entry has what is read of it: non-negative whole ``host_bytes`` and ``overhead``."""
    if not isinstance(entry, dict):
        return False
    return all(type(entry.get(field)) is int and entry[field] >= 0 for field in ("host_bytes", "overhead"))


class Footprints:
    """Expected footprints of profiles, and the measured peaks that improve them."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._peaks: dict[str, dict[str, Any]] = self._load()
        self._overheads: list[int] = [int(entry["overhead"]) for entry in self._peaks.values() if "overhead" in entry]

    def _load(self) -> dict[str, dict[str, Any]]:
        """The file's entries that can be used; each one that cannot is skipped and named in a
        warning (the file is the launcher's own notes: one bad entry must not stop a start)."""
        try:
            data = json.loads(Path(self._path).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply to decode
            log.warning("ignoring the measured footprints in %s: %s", self._path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring the measured footprints in %s: not a JSON object", self._path)
            return {}
        entries, bad = {}, []
        for key, value in data.items():
            if _usable(value):
                entries[str(key)] = value
            else:
                bad.append(str(key))
        if bad:
            log.warning("skipping %d unusable entr%s of %s: %s (each needs host_bytes and overhead, whole numbers "
                        "of bytes)", len(bad), "y" if len(bad) == 1 else "ies", self._path,
                        ", ".join(repr(key[:80]) for key in bad[:5]) + (" ..." if len(bad) > 5 else ""))  # fmt: skip
        return entries

    def expected(self, name: str, profile: ModelProfile, gpu_sizes: dict[str, int], gpu_uuids: list[str]) -> Expected:
        """What ``profile`` should hold, with the GPUs it would get (``gpu_uuids``) and their sizes."""
        share = gpu_utilization(profile.options)
        gpu = {uuid: int(share * gpu_sizes.get(uuid, 0)) for uuid in gpu_uuids}
        if profile.gpu_memory is not None:
            gpu = {uuid: parse_size(profile.gpu_memory) for uuid in gpu_uuids}
        if profile.memory is not None:
            return Expected(Footprint(parse_size(profile.memory), gpu), "declared")
        peak = self._peaks.get(profile_key(name, profile))
        if peak is not None:
            return Expected(Footprint(int(peak["host_bytes"]), gpu), "measured")
        path = model_path(profile.options)
        return Expected(Footprint(weight_bytes(path) + kv_cache_bytes(profile) + self.overhead(), gpu), "estimated")

    def overhead(self) -> int:
        """Host bytes an instance holds beyond its weights and KV cache: the median of those measured."""
        if not self._overheads:
            return DEFAULT_OVERHEAD
        ordered = sorted(self._overheads)
        return ordered[len(ordered) // 2]

    def remember(self, name: str, profile: ModelProfile, peak: Footprint) -> None:
        """A front-door instance of ``profile`` held ``peak`` at most: kept, and written down."""
        key = profile_key(name, profile)
        known = self._peaks.get(key, {})
        if known.get("host_bytes", 0) >= peak.host_bytes:
            return
        overhead = max(0, peak.host_bytes - weight_bytes(model_path(profile.options)) - kv_cache_bytes(profile))
        self._peaks[key] = {"model": name, "host_bytes": peak.host_bytes, "overhead": overhead}
        self._overheads = [int(entry["overhead"]) for entry in self._peaks.values() if "overhead" in entry]
        self._save()

    def _save(self) -> None:
        folder = os.path.dirname(self._path) or "."
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".footprints-", delete=False) as file:
                json.dump(self._peaks, file, indent=1)
            os.replace(file.name, self._path)  # whole or not at all: a reader never sees half a file
        except OSError as exc:
            log.warning("could not keep measured footprints in %s: %s", self._path, exc)
