"""A launcher "pod" for the FMA controller replay: the launcher in a network namespace of its own.

In llm-d FMA every launcher is a Kubernetes pod: the controller reaches its API at
``http://<pod IP>:8001`` and each instance at ``http://<pod IP>:<ISC port>``, and two launchers
on one node may run instances on the same port (FMA's "same-node port collision" case). One
host has one set of ports, so a pod here is a new network namespace (``unshare --net``, with a
user namespace where the test is not root) whose ports the test reaches through relays::

    unshare --user --map-root-user --net python -m tests.fma_pod FD:PORT ... -- COMMAND ...

brings the namespace's loopback up, starts COMMAND (the launcher, as the pod's container), and
relays each connection accepted on an inherited listening socket FD (bound by the test in its
own namespace, on 127.0.0.1) to ``127.0.0.1:PORT`` inside, as a pod IP reaches the pod's ports.
SIGTERM and SIGINT are passed on to COMMAND (the kubelet stopping the container); the pod exits
with COMMAND's exit code, or when COMMAND exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
import struct
import subprocess
import sys
import threading
from types import FrameType

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """``ip link set lo up``: a new network namespace starts with its loopback down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _connect(client: socket.socket, port: int) -> None:
    with client:
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            return  # nothing listens there (yet): the client sees the connection closed
        with upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def _relay(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_connect, args=(client, port), daemon=True).start()


def main(argv: list[str]) -> int:
    """Run COMMAND in this (new) network namespace and relay the inherited sockets to its ports."""
    split = argv.index("--")
    relays, command = argv[:split], argv[split + 1 :]
    loopback_up()
    child = subprocess.Popen(command)

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for relay in relays:
        fd, port = (int(part) for part in relay.split(":"))
        listener = socket.socket(fileno=fd)
        threading.Thread(target=_relay, args=(listener, port), daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
