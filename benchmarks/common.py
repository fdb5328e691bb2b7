"""Shared helpers of the benchmark scripts: machine description, timing, tables, JSON."""
import datetime
import json
import os
import platform
import re
import statistics
import time

import torch


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown cpu"


def cpu_details() -> dict:
    """Family / model / widest vector ISA: a VM may call every host "AMD EPYC", and two
    hosts of one pool differed 2.4x in float32 GEMM rate per core (benchmarks/README.md)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    from dnnrl_ext._extension import cpu_tile_gemm  # the GEMM our float32 tiles take on this host
    return {"cpu_vendor": info.get("vendor_id"), "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"),
            "cpu_isa": isa, "cpu_tile_gemm": cpu_tile_gemm()}


def cpu_gemm_gflops(m: int = 512, n: int = 1024, k: int = 512) -> dict:
    """One thread's float32 matrix-multiply rate (GFLOP/s) through at::mm (MKL) and, where
    torch has it, oneDNN (the CPU kernels' tile product): the yardstick that makes CPU
    figures from different hosts comparable. About a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, w = torch.randn(m, k), torch.randn(n, k)
        rates = {"mkl": 2 * m * n * k / time_cpu(lambda: torch.mm(a, w.t()), repeats=20) / 1e9}
        if torch.backends.mkldnn.is_available():
            linear = torch.ops.mkldnn._linear_pointwise
            rates["onednn"] = 2 * m * n * k / time_cpu(lambda: linear(a, w, None, "none", [], ""), repeats=20) / 1e9
        return {name: round(rate, 1) for name, rate in rates.items()}
    finally:
        torch.set_num_threads(threads)


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        **cpu_details(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def card_slug(info: dict) -> str:
    name = info.get("gpu") or ("cpu-%dcore" % info["cores"])
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def time_cpu(fn, repeats: int = 10, warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Median wall time of fn() in seconds (CPU work is synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def time_cuda(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median device time of fn() in seconds, with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def print_table(rows, columns) -> str:
    """Render rows (dicts) as a GitHub markdown table, print it and return it."""
    def fmt(v):
        if isinstance(v, float):
            return "%.3g" % v if abs(v) < 1000 else "%.0f" % v
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print("wrote", path, flush=True)
