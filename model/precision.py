"""Which arithmetic precision a run uses: whether this machine multiplies bfloat16 matrices in hardware, and what
``--precision auto`` resolves to.

bfloat16 is worth it only where the hardware multiplies it natively: NVIDIA GPUs from Ampere on (compute capability
8.0), Intel Xeons with AMX (``amx_bf16``, since Sapphire Rapids) and x86 CPUs with AVX-512 BF16 (``avx512_bf16``:
Cooper Lake, AMD Zen 4 and later). Elsewhere PyTorch emulates it, slower than float32, so ``auto`` keeps float32.
Where bfloat16 runs, the reranker's distances keep float32 cancellation (model/bf16_attention.py); the accuracy
that ``auto`` relies on is measured by benchmarks/bench_cpu_precision.py.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
# /proc/cpuinfo flags of x86 CPUs whose matrix units multiply bfloat16 (oneDNN uses them for torch's bf16 matmul)
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")
MIN_CUDA_CAPABILITY_BF16 = (8, 0)  # Ampere: the first NVIDIA tensor cores with bfloat16
# The stages where "auto" may run bfloat16: a stage is switched on only when benchmarks/bench_cpu_precision.py shows
# it meets the accuracy bar on the trained toy model (>= 99.5% of the reranked top-1 unchanged and recall@1/5/10
# within 0.1, the bar of benchmarks/bench_toy_accuracy.py). Measured (1,230 queries, against float32): bf16 autocast
# extraction keeps 86.1% of the top-1 (R@1 -1.6); the stage0_bf16 reranker kernel 99.27% (R@1 0.0, R@5/10 0.08).
AUTO_BF16_STAGES = {"extraction": False, "reranking": False}


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU feature flags the Linux kernel reports (the ``flags`` lines of /proc/cpuinfo); an empty set where
    there is no such file (macOS, Windows) or it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (x86 ``amx_bf16`` or ``avx512_bf16``) and this
    torch build can use it (oneDNN with AVX-512 code paths). False on other CPUs, on non-Linux systems where the flags
    cannot be read, and on ARM (bf16 instructions exist there, but no speed-up of torch's bf16 path was measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if not capability.startswith("AVX512"):
        return False
    return bool(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True when the CUDA device's tensor cores take bfloat16 (compute capability 8.0 or newer)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= MIN_CUDA_CAPABILITY_BF16


@dataclass(frozen=True)
class StagePrecisions:
    """What ``--precision`` asked for, what each stage of an evaluation runs ("fp32" or "bf16") and why."""

    requested: str  # "auto", "fp32" or "bf16"
    extraction: str  # the network's forward (backbone and local features)
    reranking: str  # the reranker
    reason: str

    def to_dict(self) -> dict[str, str]:
        """{"requested", "extraction", "reranking", "reason"}, as results.json records it (docs/outputs.md)."""
        return asdict(self)


def resolve_precision(requested: str, device: torch.device, stage: str | None = None) -> str:
    """``--precision`` ("auto", "fp32" or "bf16") on ``device`` -> the precision to run: "fp32" or "bf16".

    "fp32" and "bf16" are kept as asked (bf16 on hardware without it is slow, and a warning says so). "auto" picks
    "bf16" on a CUDA device of compute capability >= 8.0 and on a CPU with native bfloat16 matrix products
    (cpu_has_native_bf16), "fp32" elsewhere; with a ``stage`` ("extraction" or "reranking") only where
    AUTO_BF16_STAGES allows it. The log says which and why.
    """
    device = torch.device(device)
    chosen, why = _choose(requested, device, stage)
    if requested == "auto":
        logger.info("--precision auto: %s%s on %s (%s)", chosen, f" for {stage}" if stage else "", device.type, why)
    elif why:
        logger.warning("--precision %s on %s: %s", requested, device.type, why)
    return chosen


def resolve_stage_precisions(requested: str, device: torch.device) -> StagePrecisions:
    """``--precision`` on ``device`` -> the precision of each stage (resolve_precision's rules per stage), logged
    once in one line."""
    device = torch.device(device)
    (extraction, why_extraction), (reranking, why_reranking) = (
        _choose(requested, device, stage) for stage in ("extraction", "reranking")
    )
    reasons = dict.fromkeys(why for why in (why_extraction, why_reranking) if why)  # once each, in order
    reason = "; ".join(reasons) or f"--precision {requested}"
    choice = StagePrecisions(requested, extraction, reranking, reason)
    log = logger.warning if requested == "bf16" and reasons else logger.info
    log("--precision %s on %s: extraction %s, reranking %s (%s)", requested, device.type, extraction, reranking, reason)
    return choice


def _choose(requested: str, device: torch.device, stage: str | None) -> tuple[str, str]:
    """(the precision resolve_precision picks, why; "" for an explicit choice the hardware runs natively)."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if stage is not None and stage not in AUTO_BF16_STAGES:
        raise ValueError(f"stage must be one of {', '.join(AUTO_BF16_STAGES)}, got {stage!r}")
    native = _has_native_bf16(device)
    if requested == "auto":
        if native and stage is not None and not AUTO_BF16_STAGES[stage]:
            return "fp32", f"bfloat16 {stage} misses the accuracy bar (model.precision.AUTO_BF16_STAGES)"
        return ("bf16" if native else "fp32"), _why(device, native)
    if requested == "bf16" and not native:
        return requested, f"{_why(device, False)}, so bfloat16 is emulated and slow"
    return requested, ""


def _has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def _why(device: torch.device, native: bool) -> str:
    if device.type == "cuda":
        return (
            "its tensor cores multiply bfloat16" if native else "compute capability below 8.0: no bfloat16 tensor cores"
        )
    if device.type == "cpu":
        if native:
            return (
                "this CPU multiplies bfloat16 in hardware ("
                + ", ".join(sorted(cpu_flags() & {*NATIVE_BF16_CPU_FLAGS}))
                + ")"
            )
        return f"this CPU has no native bfloat16 matrix multiply (none of the flags {', '.join(NATIVE_BF16_CPU_FLAGS)})"
    return f"no bfloat16 fast path is known for {device.type}"
