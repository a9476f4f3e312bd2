"""Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()
