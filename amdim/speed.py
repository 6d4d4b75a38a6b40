"""Which speed options a run uses on the device it runs on, and why.

Four config keys take ``auto``: ``train.amp``, ``train.matmul_precision``,
``train.channels_last`` and ``optim.fused``. ``auto`` resolves by what the machine reports, never
by assumption:

* ``train.amp=auto``: bf16 autocast on CUDA; on a CPU only where PyTorch reports native bf16
  arithmetic (``torch.cpu.get_capabilities()``: AMX-BF16 or AVX512-BF16), since elsewhere oneDNN
  emulates it and a bf16 step ran 7.5x slower than fp32 (a 2-core AVX2 AMD EPYC, issue 14).
* ``train.matmul_precision=auto``: TF32 tensor cores for the fp32 matmuls on CUDA (the NCE score
  matmul runs in fp32 even under autocast, spec 11.2); full fp32 on a CPU, which has no TF32.
  ``bf16`` gives the NCE score matmul bf16 inputs with fp32 accumulation on any device (the loss
  stays within 1 % of fp32's and the gradient within 1 % of its norm:
  tests/test_matmul_precision.py).
* ``train.channels_last=auto`` and ``optim.fused=auto``: on for the CPU, where they were at least
  as fast as the plain step on every CPU measured (docs/benchmarks.md); off on CUDA until a GPU
  measurement (``scripts/gpu-check``) shows they are at least as fast there.

``train.compile`` stays an explicit choice: compiling costs tens of seconds before the first step.

On CUDA every run also turns on cuDNN's autotuner (``torch.backends.cudnn.benchmark``): every
shape of a run is fixed, so the fastest convolution algorithm is found once per shape.
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


def host_syncs_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing beyond the read: on the CPU the
    value is already there; on a GPU the host waits for every queued kernel (a host sync), so the
    trainer and the augmentation take their sync-free paths there (tests/test_host_syncs.py runs
    those paths on the CPU by making this return False)."""
    return device.type == "cpu"


@dataclass(frozen=True)
class SpeedOptions:
    """The options a step runs with, each with the reason it was chosen."""

    amp: torch.dtype | None  # the autocast dtype, None for fp32
    channels_last: bool
    fused: bool
    compile: bool
    matmul: str = "fp32"  # fp32 | tf32 | bf16 (see train.matmul_precision)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def score_precision(self) -> str:
        """The NCE score matmul's inputs: ``bf16`` or ``fp32`` (TF32 is a backend setting)."""
        return "bf16" if self.matmul == "bf16" else "fp32"

    def as_dict(self) -> dict:
        return {
            "amp": str(self.amp or torch.float32).removeprefix("torch."),
            "matmul_precision": self.matmul,
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
    matmul, reasons["matmul"] = _matmul_precision(train.matmul_precision, device)
    not_measured = "not measured on a GPU yet: scripts/gpu-check decides"
    channels_last, reasons["channels_last"] = _switch(
        "channels_last", train.channels_last, device, not_measured
    )
    fused, reasons["fused"] = _switch("fused", optim.fused, device, not_measured)
    backend = f", backend {train.compile_backend}" if train.compile else ""
    reasons["compile"] = (
        f"set to {str(train.compile).lower()}{backend} (never automatic: compiling takes tens of seconds)"
    )
    return SpeedOptions(amp, channels_last, fused, bool(train.compile), matmul, reasons)


def _matmul_precision(value: str, device: torch.device) -> tuple[str, str]:
    if value == "auto":
        if device.type == "cuda":
            return "tf32", "auto on cuda: TF32 tensor cores for fp32 matmuls"
        return "fp32", f"auto on {device.type}: fp32 (TF32 is CUDA-only)"
    if value == "tf32" and device.type != "cuda":
        return "fp32", f"set to tf32, which is CUDA-only: fp32 on {device.type}"
    if value == "bf16":
        return "bf16", "set to bf16: the NCE scores from bf16 inputs, fp32 accumulation"
    return value, f"set to {value}"


def prepare(core: torch.nn.Module, options: SpeedOptions, device: torch.device) -> torch.nn.Module:
    """Apply ``options`` to a freshly built AMDIM on ``device`` and to the process's backends, as
    :func:`amdim.trainer.fit` and ``amdim bench`` both do before the first step: the NCE score
    precision, channels_last weights, and on CUDA the fp32 matmul precision (TF32 or IEEE) and
    cuDNN's autotuner. Returns the module to train (``core``, converted in place)."""
    core.score_precision = options.score_precision
    if options.channels_last:
        core = core.to(memory_format=torch.channels_last)
    set_backends(options, device)
    return core


def set_backends(options: SpeedOptions, device: torch.device) -> None:
    """The process-wide backend settings of ``options`` on CUDA (nothing elsewhere): the fp32
    matmul precision (TF32 or IEEE) and cuDNN's autotuner (every shape of a run is fixed, so each
    convolution's fastest algorithm is found once)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if options.matmul == "tf32" else "highest")
        torch.backends.cudnn.benchmark = True
