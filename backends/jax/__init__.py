"""Our own DP-SGD in JAX: jit-compiled per-example gradients, clipping, Gaussian noise.

Importing the package sets one XLA flag for this process, before JAX starts its CPU client (which reads
XLA_FLAGS once; a per-jit `compiler_options` does not reach this one). XLA's CPU scheduler that favours
concurrency keeps many buffers alive at once; without it the compiled steps need about half the temporary
memory (ResNet-18-GN at batch 320: DP 716 -> 290 MB, non-private 400 -> 202 MB) and run as fast or faster on
2 cores, since `backend.split_sum` already gives the runtime independent work. Only jaxlib releases known to
have the flag get it: XLA aborts on a flag it does not know.
"""

import importlib.metadata
import os

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
FLAG_SINCE = (0, 4, 31)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def _set_xla_flags() -> None:
    try:
        jaxlib = _release(importlib.metadata.version("jaxlib"))
    except importlib.metadata.PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if jaxlib >= FLAG_SINCE and CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()


_set_xla_flags()
