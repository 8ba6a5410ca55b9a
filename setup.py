"""The optional compiled CPU kernels (smollm3_triton._cpu, csrc/cpu/): built by `pip install`
where a C compiler is found on Linux x86-64; anywhere else, or if the build fails, the
package installs without them and the cpu backend runs on torch's ops (kernels/cpu_fast.py).
Everything else about the package is in pyproject.toml."""
import platform
import sys

from setuptools import Extension, setup


def cpu_kernels() -> list[Extension]:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    sources = ["module.c", "pool.c", "qgemm.c", "qgemm_avx512.c", "qgemm_avx2.c", "qgemm16_avx512.c", "qgemm16_avx2.c", "ops.c", "attn.c", "step.c", "gguf_blocks.c"]
    return [Extension("smollm3_triton._cpu", sources=[f"csrc/cpu/{s}" for s in sources],
                      depends=["csrc/cpu/pool.h", "csrc/cpu/qgemm.h", "csrc/cpu/ops.h", "csrc/cpu/step.h"],
                      # Per-function target attributes pick AVX2 / AVX-512 code; the module as a
                      # whole runs on any x86-64 and refuses to import without AVX2.
                      extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off", "-Wall"],
                      libraries=["m"], optional=True)]


setup(ext_modules=cpu_kernels())
