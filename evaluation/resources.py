"""Peak memory of a block of work, per method (the paper's Figure 11 reports runtime; we add
memory): the CUDA allocator's peak on a GPU, else the process's peak resident set size."""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _peak_rss_mib() -> float | None:
    """VmHWM (Linux): the most resident memory this process has held since its last reset."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.mib` (None where unmeasurable).

    On CPU the whole process counts (the loaded models included), so differences between
    methods are what each one adds on top of the same resident store.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = _peak_rss_mib()
