"""Which speed options a run uses on the device it runs on, and why.

Three config keys take ``auto``: ``train.amp``, ``train.channels_last`` and ``optim.fused``.
``auto`` resolves by what the machine reports, never by assumption:

* ``train.amp=auto``: bf16 autocast on CUDA; on a CPU only where PyTorch reports native bf16
  arithmetic (``torch.cpu.get_capabilities()``: AMX-BF16 or AVX512-BF16), since elsewhere oneDNN
  emulates it and a bf16 step ran 7.5x slower than fp32 (a 2-core AVX2 AMD EPYC, issue 14).
* ``train.channels_last=auto`` and ``optim.fused=auto``: on for the CPU, where they were at least
  as fast as the plain step on every CPU measured (docs/benchmarks.md); off on CUDA until a GPU
  measurement (``scripts/gpu-check``) shows they are at least as fast there.

``train.compile`` stays an explicit choice: compiling costs tens of seconds before the first step.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch

# Measured on a CPU (docs/benchmarks.md): on for "auto"; CUDA: not measured yet, so off.
AUTO_ON = {"channels_last": {"cpu"}, "fused": {"cpu"}}


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> dict:
    """What PyTorch reports about this CPU (``torch.cpu.get_capabilities``; empty if unknown)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else {}
    except Exception:  # an old torch, or a CPU it cannot probe
        return {}


def native_cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AMX-BF16 or AVX512-BF16)."""
    caps = cpu_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def cpu_description() -> str:
    """The CPU's model and the flags that decide the speed options, for benchmark records."""
    caps = cpu_capabilities()
    model = caps.get("cpu_name") or platform.processor() or platform.machine()
    flags = [f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(f)]
    absent = [f for f in ("avx512_bf16", "amx_bf16") if not caps.get(f)]
    text = f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(flags) or 'none of avx2/avx512/amx'}"
    return text + (f" (no {', no '.join(absent)})" if absent else "")


@dataclass(frozen=True)
class SpeedOptions:
    """The options a step runs with, each with the reason it was chosen."""

    amp: torch.dtype | None  # the autocast dtype, None for fp32
    channels_last: bool
    fused: bool
    compile: bool
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "amp": str(self.amp or torch.float32).removeprefix("torch."),
            "channels_last": self.channels_last,
            "fused_adam": self.fused,
            "compile": self.compile,
            "why": dict(self.reasons),
        }


def _switch(name: str, value: str, device: torch.device, measured: str) -> tuple[bool, str]:
    if value in ("true", "false"):
        return value == "true", f"set to {value}"
    on = device.type in AUTO_ON[name]
    where = "at least as fast as the plain step on every CPU measured" if device.type == "cpu" else measured
    return on, f"auto on {device.type}: {'on' if on else 'off'} ({where})"


def resolve(train, optim, device: torch.device) -> SpeedOptions:
    """The speed options of ``train`` (a TrainConfig) and ``optim`` (an OptimConfig) on ``device``."""
    reasons = {}
    if train.amp == "bf16":
        amp, reasons["amp"] = torch.bfloat16, "set to bf16"
    elif train.amp == "off":
        amp, reasons["amp"] = None, "set to off"
    elif device.type == "cuda":
        amp, reasons["amp"] = torch.bfloat16, "auto on cuda: bf16 autocast"
    elif native_cpu_bf16():
        amp, reasons["amp"] = (
            torch.bfloat16,
            "auto on cpu: bf16 (PyTorch reports native AMX-BF16 or AVX512-BF16)",
        )
    else:
        amp, reasons["amp"] = (
            None,
            "auto on cpu: fp32 (no native bf16 reported: AMX-BF16 / AVX512-BF16 absent)",
        )
    not_measured = "not measured on a GPU yet: scripts/gpu-check decides"
    channels_last, reasons["channels_last"] = _switch(
        "channels_last", train.channels_last, device, not_measured
    )
    fused, reasons["fused"] = _switch("fused", optim.fused, device, not_measured)
    backend = f", backend {train.compile_backend}" if train.compile else ""
    reasons["compile"] = (
        f"set to {str(train.compile).lower()}{backend} (never automatic: compiling takes tens of seconds)"
    )
    return SpeedOptions(amp, channels_last, fused, bool(train.compile), reasons)
