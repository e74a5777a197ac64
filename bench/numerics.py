"""CPU numerics that do not depend on which x86 CPU a run lands on.

PyTorch picks its CPU kernels by the instruction set the machine offers: ATen's vectorised
kernels (``DEFAULT``/``AVX2``/``AVX512``), oneDNN's convolutions and MKL's GEMM each have one code
path per ISA, and each path sums in its own order. A model trained for a few hundred steps
amplifies those last-bit differences: the same commit gave a `supervised` rsna-cls AUROC of 0.677
on one machine and 0.689 on another. Capping ATen and oneDNN at AVX2 (the common ground of every
x86-64 machine this project has run on) makes an AVX-512 machine take an AVX2 machine's kernels,
and MKL's conditional numerical reproducibility (``MKL_CBWR=AVX2,STRICT``) makes its GEMM results
independent of the CPU's make and model for a given thread count (MKL's own promise; without it,
MKL chooses per CPU). Measured on an AVX2 machine (AMD EPYC): the ISA caps alone change nothing
(bit-identical weights after 15 training steps), whereas switching MKL's reproducible mode on
changes the last bits of some GEMMs (the `supervised` rsna-ft 10% AUROC goes from 0.8364 to
0.8349), so results written before the caps differ from new ones in the last digits.

The caps are environment variables that each library reads once, at its first kernel call, so
:func:`pin_cpu_numerics` runs when ``bench`` is imported, before any tensor work. A variable the
user set is left alone, and ``MEDVLP_BENCH_CPU_ISA=native`` switches the caps off (for speed on
AVX-512 hardware, at the price of numbers that differ from the committed ones in the last digits).
This module imports nothing heavy on purpose.

It also makes OpenMP's idle threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``, unless set):
with torch's two intra-op threads on a 2-core machine that runs anything else, a spinning thread
starves its partner at every barrier. Measured on such a machine under load: 15 training steps of
the tiny ResNet took 44-56 s spinning and 8-10 s sleeping, with bit-identical weights (the wait
policy decides how threads wait, never how work is split). libgomp reads it when torch loads it,
which is why this runs before any ``import torch`` in the package.
"""
from __future__ import annotations

import os
import platform

#: ``MEDVLP_BENCH_CPU_ISA``: ``avx2`` (default) or ``native`` (no caps).
ISA_ENV = "MEDVLP_BENCH_CPU_ISA"
#: Library variable -> value that caps it at AVX2.
AVX2_CAPS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",       # ATen's vectorised CPU kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",        # oneDNN (convolutions, some matmuls)
    "MKL_CBWR": "AVX2,STRICT",           # MKL's conditional numerical reproducibility (GEMM)
}


def pin_cpu_numerics() -> dict[str, str]:
    """Set the AVX2 caps (unless ``native`` or not x86-64); return the caps now in force."""
    mode = os.environ.get(ISA_ENV, "avx2").strip().lower()
    if mode not in ("avx2", "native"):
        raise ValueError(f"${ISA_ENV} must be 'avx2' or 'native', got {mode!r}")
    if mode == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in AVX2_CAPS.items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return numerics_settings()


def numerics_settings() -> dict[str, str]:
    """The cap variables as they are in this process (recorded with every result)."""
    return {key: os.environ[key] for key in AVX2_CAPS if key in os.environ}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
