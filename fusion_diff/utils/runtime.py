"""Where and in what precision a model runs: the start-up line every model prints, and the bf16-on-CPU check.

bfloat16 matrix products are fast on CPUs with AVX512_BF16 or AMX and on GPUs; elsewhere PyTorch
emulates them, and on an AVX2-only CPU a bf16 matmul ran at under 1 GFLOP/s against 118 GFLOP/s in
fp32 (issue 19): a 100x slow-down that looks like a hang. So bf16 on such a CPU gets a warning that
names the fix (it is still run: results are right, only slow, and tests of bf16 code paths need it).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("fusion_diff.runtime")

BF16_NAMES = ("bf16", "bfloat16", "torch.bfloat16")
_FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool | None, str]:
    """(fast bf16 matmuls on this CPU?, what was found). None when it cannot be told (not Linux)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None, f"CPU capability {capability}; CPU flags unknown"
    flags = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    found = [flag for flag in _FAST_BF16_FLAGS if flag in flags]
    what = f"CPU capability {capability}, " + (f"flags {', '.join(found)}" if found else "no AVX512_BF16 / AMX")
    return bool(found), what


def slow_bf16_warning(device: object, dtype: object, component: str) -> str | None:
    """The warning for bf16 on a CPU without fast bf16 (naming the fix), or None when the precision is fine."""
    if str(dtype) not in BF16_NAMES or not str(device).startswith("cpu"):
        return None
    fast, what = cpu_bf16_support()
    if fast is not False:
        return None
    return (
        f"{component}: bf16 on this CPU ({what}) is emulated, up to ~100x slower than fp32. Use fp32 on this "
        "machine (--precision fp32 / --dtype fp32), or run bf16 on a GPU or a CPU with AVX512_BF16 / AMX."
    )


def announce(component: str, device: object, dtype: object) -> None:
    """The start-up line: which model runs where, in what precision (and the slow-bf16 warning)."""
    warning = slow_bf16_warning(device, dtype, component)
    if warning:
        logger.warning(warning)
    logger.info("%s on %s, %s", component, device, str(dtype).removeprefix("torch."))


@functools.cache
def warn_slow_bf16_once(device: object, dtype: object, component: str) -> None:
    """The slow-bf16 warning for code that runs many times (sampling, training steps): once per setting."""
    warning = slow_bf16_warning(device, dtype, component)
    if warning:
        logger.warning(warning)


def adamw(params: Any, **options: Any) -> Any:
    """``torch.optim.AdamW`` with the fused kernel where every parameter allows it (floating point, on a CPU or a
    GPU): one pass over all tensors instead of a Python loop over them. Same update rule; on the 2-core AMD EPYC
    (AVX2) the world backbone's optimizer step fell from 263 to 29 ms (issue 19, shared machine, 1 thread)."""
    import torch

    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **options)
