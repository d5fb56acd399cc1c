"""Where and how computation runs: device choice and mixed precision."""

from __future__ import annotations

import resource
import sys

import torch

from selfreplay.errors import SelfReplayError


def resolve_device(name: str = "cpu") -> torch.device:
    """'cpu', 'cuda' (or 'cuda:N') or 'auto' (CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfReplayError(f"device {name!r} was asked for but no CUDA GPU is available: use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SelfReplayError(f"unknown device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for precision 'bf16', a no-op context for 'fp32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(peak memory in MiB, what was measured): on CUDA the most tensor memory allocated on the
    device; elsewhere the process's peak resident set (Python, torch and data included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"
