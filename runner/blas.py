"""Which BLAS the coordinator's MLX children run with (`[coordinator] blas`).

MLX's Linux CPU wheel links the reference BLAS (`mlx_cpu.libs/libblas-*.so`): a float32 matmul there runs several
times slower than with an optimized BLAS that exports the same CBLAS symbols. Preloading one (Debian's
`libopenblas0-pthread`) into the generation workers and the learner makes every float matmul use it, without a
change to MLX or to model code. Only that CPU build gets one: on macOS MLX runs on Metal and Accelerate, and its
CUDA build runs matmuls on the GPU, so nothing is preloaded there.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from pathlib import Path

from runner.config import ConfigError

log = logging.getLogger(__name__)

# Debian/Ubuntu's `libopenblas0-pthread`, per architecture (`apt-get install libopenblas0-pthread`).
OPTIMIZED_BLAS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
]


# The packages that hold MLX's compiled library on Linux (`mlx[cpu]`, `mlx[cuda12]`, `mlx[cuda13]`).
MLX_BUILDS = {"mlx-cuda-13": "cuda", "mlx-cuda-12": "cuda", "mlx-cuda": "cuda", "mlx-cpu": "cpu"}


def mlx_build(platform: str = sys.platform) -> str | None:
    """Which MLX build this Python has, read from the installed packages without loading MLX (the control plane
    never imports it): "metal" on macOS, "cuda" or "cpu" on Linux, None when no build is installed."""
    if platform == "darwin":
        return "metal"
    for package, build in MLX_BUILDS.items():
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        return build
    return None


def blas_library(setting: str, platform: str = sys.platform, build: str | None = None) -> str | None:
    """The shared library to preload into MLX children, or None for MLX's bundled BLAS. `setting`: "auto" (an
    optimized BLAS when one is installed), "bundled" (never preload) or the path of a library. Only MLX's Linux CPU
    build (`build`, default: the installed one) ever gets one."""
    if not platform.startswith("linux") or setting == "bundled" or (build or mlx_build(platform)) != "cpu":
        return None
    if setting == "auto":
        return next((path for path in OPTIMIZED_BLAS if Path(path).is_file()), None)
    if not Path(setting).is_file():
        raise ConfigError(
            f"coordinator.blas = {setting!r} is not a file; expected 'auto', 'bundled' or the path of a BLAS "
            "shared library (e.g. Debian's libopenblas0-pthread: /usr/lib/x86_64-linux-gnu/openblas-pthread/"
            "libopenblas.so.0)"
        )
    return setting


def child_environment(library: str | None, processes: int = 1) -> dict[str, str]:
    """This process's environment, with `library` first in LD_PRELOAD when given. The `processes` MLX children of a
    job share the machine's cores: each gets OpenBLAS threads for its share (at least 1) unless the caller set
    OPENBLAS_NUM_THREADS, because every OpenBLAS process otherwise starts a thread per core, and on a machine the
    processes share, those threads contend for the same cores (measured here: twice the CPU per step)."""
    env = dict(os.environ)
    if library:
        env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(processes, 1))))
    return env
