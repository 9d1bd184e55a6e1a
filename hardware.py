"""What this machine's MLX build runs on: a bottom module that every layer may use, importing nothing of ours.

`probe()` describes the machine from what the OS and MLX report (no table of known machines);
`machine_memory()` is the stdlib-only figure the quantisation planner sizes models against.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def available_memory() -> int:
    """Memory that can be used now without swapping: Linux's MemAvailable (which counts reclaimable
    page cache), else the free pages."""
    return meminfo_available() or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    line = next((line for line in lines if line.startswith("MemAvailable:")), None)
    return int(line.split()[1]) * 1024 if line else None


# cgroup v1 writes "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
UNLIMITED_CGROUP_BYTES = 1 << 60
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def machine_memory() -> int:
    """The memory a model may use on this machine: physical memory, capped by a cgroup limit."""
    limit = cgroup_memory_limit()
    return min(physical_memory(), limit) if limit else physical_memory()


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2, else v1), or None when there is none."""
    for path in cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED_CGROUP_BYTES:
            return int(text)
    return None


def cgroup_limit_files() -> list[Path]:
    own = own_cgroup_paths()
    v2 = [CGROUP_V2_ROOT / own["v2"].lstrip("/") / "memory.max"] if "v2" in own else []
    v1 = [CGROUP_V1_MEMORY / own["memory"].lstrip("/") / "memory.limit_in_bytes"] if "memory" in own else []
    return [*v2, CGROUP_V2_ROOT / "memory.max", *v1, CGROUP_V1_MEMORY / "memory.limit_in_bytes"]


def own_cgroup_paths() -> dict[str, str]:
    """From /proc/self/cgroup: {"v2": path} for the unified hierarchy, {"memory": path} for v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
    return paths


def probe() -> dict:
    """This machine as the OS and MLX describe it: CPU, memory and accelerator."""
    return {"os": platform.system(), "arch": platform.machine(), "cpu": cpu_description(), "memory": memory_report(),
            "accelerator": accelerator_report()}


def memory_report() -> dict:
    return {
        "total_bytes": physical_memory(),
        "available_bytes": available_memory(),
        "cgroup_limit_bytes": cgroup_memory_limit(),
        "usable_bytes": machine_memory(),
    }


@functools.lru_cache(maxsize=1)
def cpu_description() -> dict:
    if sys.platform == "darwin":
        return mac_cpu()
    return {"model": linux_cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}


def linux_cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    # x86 names it "model name"; many ARM kernels only give "Hardware" or "Model".
    for field in ("model name", "Hardware", "Model"):
        value = next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), None)
        if value:
            return value
    return platform.processor() or None


def mac_cpu() -> dict:
    performance, efficiency = sysctl("hw.perflevel0.physicalcpu"), sysctl("hw.perflevel1.physicalcpu")
    return {
        "model": sysctl("machdep.cpu.brand_string"),
        "cores": os.cpu_count(),
        "performance_cores": int(performance) if performance else None,
        "efficiency_cores": int(efficiency) if efficiency else None,
        "gpu_cores": mac_gpu_cores(),
    }


def sysctl(name: str) -> str | None:
    return command_output(["sysctl", "-n", name])


def mac_gpu_cores() -> int | None:
    """The `gpu-core-count` the Apple GPU driver publishes in the I/O registry."""
    output = command_output(["ioreg", "-rc", "AGXAccelerator", "-d", "1"]) or ""
    for line in output.splitlines():
        if '"gpu-core-count"' in line:
            return int(line.rsplit("=", 1)[1].strip())
    return None


def command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", command[0], exc)
        return None
    return done.stdout.strip() or None


def accelerator_report() -> dict:
    """MLX's default device, and what MLX says about the Metal or CUDA device when there is one."""
    import mlx.core as mx

    report = {"mlx_version": mx.__version__, "default_device": str(mx.default_device()), "metal": False, "cuda": False}
    report["metal"] = mx.metal.is_available()
    report["cuda"] = hasattr(mx, "cuda") and mx.cuda.is_available()
    if report["metal"] or report["cuda"]:
        report.update(device_details(mx))
    return report


def device_details(mx) -> dict:
    info = mx.device_info()
    return {
        "device_name": info.get("device_name"),
        "architecture": info.get("architecture"),
        "memory_bytes": info.get("memory_size"),
        # Metal's advice for how much memory the GPU should keep resident at once.
        "recommended_working_set_bytes": info.get("max_recommended_working_set_size"),
    }
