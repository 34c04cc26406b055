"""The forkserver's GPU fork-safety rules, checked on CPU (the H100 check is in the README).

On a GPU machine torch leaves NVML initialised while vLLM is imported; the forkserver must shut
it down completely before forking, or the children's fd sweep breaks NVML in every instance
(forkserver/fork_safety.py has the evidence). Here a small C library with NVML's reference-
counting contract (``nvmlInit_v2`` opens a descriptor the first time, ``nvmlShutdown`` closes it
when the count reaches zero and answers 1, "uninitialised", after that) stands in for
``libnvidia-ml.so.1``, and the real ``fork_safety`` module is run against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from forkserver import fork_safety
from tests.launcher_process import REPO

NVML_STANDIN = r"""
#include <fcntl.h>
#include <unistd.h>
static int refs = 0;
static int fd = -1;
int nvmlInit_v2(void) { if (refs++ == 0) fd = open("/dev/null", O_RDONLY); return 0; }
int nvmlShutdown(void) {
    if (refs == 0) return 1;               /* NVML_ERROR_UNINITIALIZED */
    if (--refs == 0) { close(fd); fd = -1; }
    return 0;                              /* NVML_SUCCESS */
}
int standin_refs(void) { return refs; }
int standin_fd(void) { return fd; }
"""


@pytest.fixture(scope="module")
def nvml_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the NVML stand-in")
    folder = tmp_path_factory.mktemp("nvml")
    (folder / "nvml.c").write_text(NVML_STANDIN)
    library = folder / "libnvidia-ml.so.1"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1", "-o", str(library), str(folder / "nvml.c")],
        check=True,
    )
    return library


def _run(code: str, library: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NVML_STANDIN": str(library)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_release_shuts_nvml_down_completely_and_closes_its_descriptors(nvml_standin: Path) -> None:
    report = _run(
        """
        import ctypes, json, os
        from forkserver import fork_safety
        nvml = ctypes.CDLL(os.environ["NVML_STANDIN"])
        for _ in range(3):       # initialised and never shut down, as torch.cuda.device_count() leaves it
            nvml.nvmlInit_v2()
        fd = nvml.standin_fd()
        before = os.path.exists(f"/proc/self/fd/{fd}")
        shutdowns = fork_safety.release_nvml()   # found by its soname, as on a GPU machine
        print(json.dumps({"before": before, "shutdowns": shutdowns, "refs": nvml.standin_refs(),
                          "fd_open_after": os.path.exists(f"/proc/self/fd/{fd}"),
                          "again": fork_safety.release_nvml()}))
        """,
        nvml_standin,
    )
    assert report == {"before": True, "shutdowns": 3, "refs": 0, "fd_open_after": False, "again": 0}


def test_release_never_loads_nvml_where_nothing_loaded_it(nvml_standin: Path) -> None:
    report = _run(
        """
        import json, os
        from forkserver import fork_safety
        shutdowns = fork_safety.release_nvml(os.environ["NVML_STANDIN"])
        loaded = any("libnvidia-ml" in line for line in open("/proc/self/maps"))
        print(json.dumps({"shutdowns": shutdowns, "loaded": loaded}))
        """,
        nvml_standin,
    )
    assert report == {"shutdowns": 0, "loaded": False}


def test_forked_child_initialises_nvml_afresh_after_release_and_sweep(nvml_standin: Path) -> None:
    """The order the forkserver uses: release, fork, sweep every fd, then NVML in the child."""
    report = _run(
        """
        import ctypes, json, os
        from forkserver import fork_safety, osutil
        nvml = ctypes.CDLL(os.environ["NVML_STANDIN"])
        nvml.nvmlInit_v2()
        fork_safety.release_nvml()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in osutil.open_fds():
                if fd > 2 and fd != w:
                    try: os.close(fd)
                    except OSError: pass
            nvml.nvmlInit_v2()
            fd = nvml.standin_fd()
            os.write(w, json.dumps({"refs": nvml.standin_refs(), "fd_valid": os.path.exists(f"/proc/self/fd/{fd}")}).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        print(json.dumps(child))
        """,
        nvml_standin,
    )
    assert report == {"refs": 1, "fd_valid": True}


def test_device_fds_lists_only_descriptors_on_the_given_device_paths(tmp_path: Path) -> None:
    device = tmp_path / "nvidia0"
    device.write_text("")
    other = tmp_path / "other"
    other.write_text("")
    with open(device) as on_device, open(other):
        found = fork_safety.device_fds(prefixes=(str(device),))
        assert found == {on_device.fileno(): str(device)}
    assert fork_safety.device_fds(prefixes=(str(device),)) == {}


def test_thread_names_put_the_main_thread_first_and_see_native_threads() -> None:
    stop = threading.Event()
    before = fork_safety.extra_threads()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        names = fork_safety.thread_names()
        assert len(names) == len(before) + 2
        assert names[0] == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert len(fork_safety.extra_threads()) == len(before) + 1
    finally:
        stop.set()
        worker.join()


def test_cuda_is_never_initialised_in_a_process_without_torch() -> None:
    assert "torch" not in sys.modules  # the test process stays lean, like the API
    assert fork_safety.cuda_initialized() is False
