"""Instance ports: pick a free one, or tell whether one is already bound on this host."""

from __future__ import annotations

import errno
import socket
from collections.abc import Container


def port_is_bound(port: int) -> bool:
    """True if something on this host already listens on ``port`` (any address)."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with probe:
            # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
    return False


def first_unprivileged_port() -> int:
    """The lowest port a user without CAP_NET_BIND_SERVICE may bind (Linux's sysctl; else 1024)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as sysctl:
            return int(sysctl.read())
    except (OSError, ValueError):
        return 1024


def pick_free_port(avoid: Container[int]) -> int:
    """A port the kernel says is free and no instance of ours is about to use."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port = int(probe.getsockname()[1])
        if port not in avoid:
            return port
    raise OSError("could not find a free port")
