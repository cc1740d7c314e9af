#!/usr/bin/env python
"""The environment step of scripts/gpu_check.sh: what the machine is and what it can do.

    python scripts/gpu_env.py --json OUT.json [--device cuda] [--site FOLDER]

Reports the GPU, torch and CUDA versions, whether flash SDPA is enabled and is the kernel the
model's own attention call runs, the read bandwidth (the decode roofline's denominator) and the
bf16 matmul rate measured here, and the packages carried as wheels into `--site` with any
requirement of theirs that this Python does not meet (they were installed with --no-deps).
"""

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

import torch

# The carried distribution whose importable name is not its own with "_" for "-".
MODULE_NAMES = {"opentelemetry-api": "opentelemetry"}


def read_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s read by a sum over a tensor far larger than the caches: the best of `repeats`
    after a warm-up (a decode step reads its weights much like this)."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        x.sum()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def attention_kernels(device: torch.device) -> list[str]:
    """The SDPA implementations (aten op names) that the model's attention runs for the 799m
    flavor's head shapes (grouped-query, head_dim 128) in bf16."""
    from torch.profiler import ProfilerActivity, profile

    from arbor_titan.models.arbor.masking import attention

    q = torch.randn(2, 12, 1024, 128, device=device, dtype=torch.bfloat16)
    kv = torch.randn(2, 4, 1024, 128, device=device, dtype=torch.bfloat16)
    attention(q, kv, kv, None)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(q, kv, kv, None)
    names = {event.key for event in prof.key_averages()}
    return sorted(n for n in names if n.startswith("aten::_scaled_dot_product"))


def device_report(device: torch.device, bandwidth_bytes: int) -> dict:
    report: dict = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "read_bandwidth_bytes_per_s": read_bandwidth(device, bandwidth_bytes),
    }
    if device.type != "cuda":
        return report
    from arbor_titan.metrics import measure_matmul_peak

    props = torch.cuda.get_device_properties(device)
    report |= {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "flash_attention_built": torch.backends.cuda.is_flash_attention_available(),
        "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "attention_kernels": attention_kernels(device),
        "bf16_matmul_flops": measure_matmul_peak(torch.bfloat16, 8192, device),
    }
    report["flash_sdp_used"] = any("flash" in k for k in report["attention_kernels"])
    return report


def carried_packages(site: Path) -> list[dict]:
    """Each distribution installed into `site`: version, whether it imports, and the requirements
    (for this Python, extras aside) that the interpreter's packages do not satisfy."""
    from packaging.requirements import Requirement

    packages = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        name = dist.metadata["Name"]
        module = MODULE_NAMES.get(name.lower(), name.lower().replace("-", "_"))
        entry: dict = {"name": name, "version": dist.version, "unmet": []}
        try:
            importlib.import_module(module)
            entry["imports"] = True
        except Exception as err:  # a broken carried wheel is reported, not fatal here
            entry["imports"], entry["error"] = False, f"{type(err).__name__}: {err}"
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                found = None
            if found is None or not requirement.specifier.contains(found, prereleases=True):
                entry["unmet"].append(f"{requirement} (found {found or 'nothing'})")
        packages.append(entry)
    return sorted(packages, key=lambda p: p["name"].lower())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--site", type=Path, help="the folder the carried wheels went into")
    parser.add_argument("--bandwidth-mib", type=int, default=4096, help="bytes the sum reads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_env: no CUDA GPU visible to {sys.executable} (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    report = device_report(device, args.bandwidth_mib * 2**20)
    report["carried"] = carried_packages(args.site) if args.site else []
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    # Reported, not fatal: the steps that need a broken package fail, the others still run.
    broken = [p["name"] for p in report["carried"] if not p["imports"] or p["unmet"]]
    if broken:
        print(f"gpu_env: carried packages that fail: {', '.join(broken)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
