"""GPU diagnostic (run on a GPU machine with `bash benchmarks/gpu/run_probe.sh`): why does NVML fail in a child forked from a process that ran nvmlInit/nvmlShutdown?

Each case runs in a fresh interpreter: the parent (like the forkserver) optionally runs NVML
init/shutdown, lists its fds, forks; the child sets itself up like an instance (setsid, fd
sweep variants) and tries NVML, optionally CUDA through torch. Prints one JSON line per case.
"""
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import time


def fds():
    out = {}
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
        except OSError:
            pass
    return names


def nvml_round(pynvml):
    pynvml.nvmlInit()
    try:
        n = pynvml.nvmlDeviceGetCount()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        cap = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        return {"count": n, "cap": list(cap)}
    finally:
        pynvml.nvmlShutdown()


def child(cfg, wfd, parent_fds):
    res = {}
    try:
        os.setsid()
        if cfg["sweep"] != "none":
            for fd, target in fds().items():
                if fd <= 2 or fd == wfd:
                    continue
                if cfg["sweep"] == "keep_nvidia" and target.startswith("/dev/nvidia"):
                    continue
                try:
                    os.close(fd)
                except OSError:
                    pass
        if cfg.get("occupy"):  # reuse freed fd numbers, as the child's log/sockets would
            for _ in range(8):
                os.open("/dev/null", os.O_RDONLY)
        if cfg.get("env_clear"):
            keep = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH")}
            os.environ.clear()
            os.environ.update(keep)
        import pynvml
        if cfg.get("fresh_lib"):
            import shutil
            import tempfile
            src = ctypes.util.find_library("nvidia-ml") or "libnvidia-ml.so.1"
            # the loaded path from /proc/self/maps
            for line in open("/proc/self/maps"):
                if "libnvidia-ml" in line:
                    src = line.split()[-1]
                    break
            dst = os.path.join(tempfile.mkdtemp(), "libnvidia-ml-copy.so.1")
            shutil.copy(src, dst)
            pynvml.nvmlLib = ctypes.CDLL(dst)
            pynvml._nvmlGetFunctionPointer_cache.clear()
            res["fresh_lib_from"] = src
        res["child_fds_before"] = fds()
        try:
            res["nvml"] = nvml_round(pynvml)
            res["nvml_ok"] = True
        except Exception as e:  # noqa
            res["nvml_ok"] = False
            res["nvml_error"] = f"{type(e).__name__}: {e}"
        if cfg.get("cuda"):
            try:
                import torch
                x = torch.ones(1024, device="cuda") * 2
                res["cuda_ok"] = float(x.sum().item()) == 2048.0
                res["cuda_mem"] = torch.cuda.memory_allocated()
            except Exception as e:  # noqa
                res["cuda_ok"] = False
                res["cuda_error"] = f"{type(e).__name__}: {e}"[:300]
        res["child_fds_after"] = fds()
    except Exception as e:  # noqa
        res["child_error"] = repr(e)
    os.write(wfd, json.dumps(res).encode())
    os._exit(0)


def run_case(cfg):
    out = {"case": cfg}
    import pynvml
    if cfg.get("import_torch"):
        import torch  # noqa
        out["threads_after_torch"] = threads()
    out["parent_fds_start"] = fds()
    for _ in range(cfg.get("parent_rounds", 0)):
        out.setdefault("parent_nvml", []).append(nvml_round(pynvml))
    lib = None
    if cfg.get("leak_init"):  # what torch.cuda._raw_device_count_nvml does: init, never shut down
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        out["leak_init_rc"] = lib.nvmlInit_v2()
    if cfg.get("torch_count"):
        import torch
        out["torch_device_count"] = torch.cuda.device_count()
        out["torch_cuda_initialized"] = torch.cuda.is_initialized()
    out["parent_fds_after_nvml"] = fds()
    out["maps_has_nvml"] = any("libnvidia-ml" in line for line in open("/proc/self/maps"))
    if cfg.get("fix_shutdown"):
        handle = ctypes.CDLL("libnvidia-ml.so.1", mode=os.RTLD_NOLOAD)
        rcs = []
        for _ in range(64):
            rc = handle.nvmlShutdown()
            rcs.append(rc)
            if rc != 0:
                break
        out["fix_shutdown_rcs"] = rcs
        out["parent_fds_after_fix"] = fds()
    out["parent_threads"] = threads()
    if cfg.get("parent_close_nvidia"):
        for fd, target in fds().items():
            if target.startswith("/dev/nvidia"):
                os.close(fd)
    results = []
    for i in range(cfg.get("children", 1)):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(cfg, w, out["parent_fds_after_nvml"])
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        results.append(json.loads(data) if data else {"no_data": True})
    out["children"] = results
    out["parent_fds_end"] = fds()
    # the parent can still use NVML afterwards?
    try:
        out["parent_after"] = nvml_round(pynvml)
    except Exception as e:  # noqa
        out["parent_after"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


CASES = {
    "A_no_parent_nvml_sweep_all": dict(parent_rounds=0, sweep="all", occupy=True),
    "B_parent_nvml_no_sweep": dict(parent_rounds=2, sweep="none"),
    "C_parent_nvml_sweep_all": dict(parent_rounds=2, sweep="all", occupy=True),
    "D_parent_nvml_sweep_keep_nvidia": dict(parent_rounds=2, sweep="keep_nvidia", occupy=True, children=2),
    "E_parent_nvml_close_in_parent": dict(parent_rounds=2, sweep="all", occupy=True, parent_close_nvidia=True),
    "F_parent_nvml_fresh_lib": dict(parent_rounds=2, sweep="all", occupy=True, fresh_lib=True),
    "G_keep_nvidia_env_clear_cuda": dict(parent_rounds=2, sweep="keep_nvidia", occupy=True, env_clear=True,
                                         cuda=True, import_torch=True, children=2),
    "H_sweep_all_no_occupy": dict(parent_rounds=2, sweep="all"),
    "J_sweep_all_cuda": dict(parent_rounds=2, sweep="all", occupy=True, cuda=True, import_torch=True),
    "L_leak_sweep_all": dict(leak_init=True, sweep="all", occupy=True),
    "M_leak_no_sweep": dict(leak_init=True, sweep="none"),
    "N_leak_keep_nvidia": dict(leak_init=True, sweep="keep_nvidia", occupy=True),
    "O_leak_fix_sweep_all": dict(leak_init=True, fix_shutdown=True, sweep="all", occupy=True, children=2),
    "P_torch_count_sweep_all": dict(torch_count=True, parent_rounds=2, sweep="all", occupy=True, cuda=True),
    "Q_torch_count_fix_sweep_all_cuda": dict(torch_count=True, parent_rounds=2, fix_shutdown=True, sweep="all",
                                             occupy=True, cuda=True, children=2),
    "K_no_parent_nvml_sweep_all_cuda": dict(parent_rounds=0, sweep="all", occupy=True, cuda=True, import_torch=True),
}

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "case":
        run_case(CASES[sys.argv[2]])
        sys.exit(0)
    summary = {}
    only = os.environ.get("CASES")
    for name in (only.split(",") if only else CASES):
        t = time.time()
        p = subprocess.Popen([sys.executable, __file__, "case", name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            so, se = p.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            import signal
            os.killpg(p.pid, signal.SIGKILL)
            so, se = p.communicate()
            so += "\nTIMEOUT"
        p.stdout, p.stderr = so, se
        line = (p.stdout.strip().splitlines() or ["{}"])[-1]
        try:
            res = json.loads(line)
        except ValueError:
            res = {"raw": p.stdout[-2000:], "err": p.stderr[-2000:]}
        res["seconds"] = round(time.time() - t, 2)
        if not res.get("children"):
            res["err"] = (p.stderr or "")[-1500:] + (p.stdout or "")[-300:]
        summary[name] = res
        kids = res.get("children", [])
        print(name, "nvml:", [k.get("nvml_ok", k.get("nvml_error")) for k in kids],
              [k.get("nvml_error") for k in kids if not k.get("nvml_ok")],
              "cuda:", [k.get("cuda_ok") for k in kids if "cuda_ok" in k],
              "parent_after:", res.get("parent_after"), flush=True)
        nv = {fd: t for fd, t in res.get("parent_fds_after_nvml", {}).items() if "nvidia" in t}
        print("   torch count:", res.get("torch_device_count"), res.get("torch_cuda_initialized"),
              "fix rcs:", res.get("fix_shutdown_rcs"), "after fix:", res.get("parent_fds_after_fix"),
              "maps nvml:", res.get("maps_has_nvml"), "raw:", str(res.get("raw", ""))[-300:], str(res.get("err", ""))[-600:])
        print("   parent nvidia fds after nvml:", nv, "threads:", res.get("parent_threads"),
              "torch threads:", res.get("threads_after_torch"), flush=True)
    out = os.environ.get("OUT", "/tmp")
    json.dump(summary, open(os.path.join(out, "nvml_probe.json"), "w"), indent=1)
