"""bench/run_gpu.sh rehearsed without a GPU, so the first GPU minutes are not lost to an
import error: a brand-new venv holding only the packages the GPU machines' image has
(torch, triton, transformers, ... but no fastapi, uvicorn, openai, ray or llama-cpp-python;
the device tool's KINDS.md lists them), gguf carried as a wheel as the script's header says,
then the script's setup and every phase's collection (REHEARSAL=1)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the image holds that the script's phases import (KINDS.md, "Python packages already there").
IMAGE_PACKAGES = ["torch==2.13.0", "triton", "transformers", "tokenizers", "safetensors", "numpy", "scipy",
                  "pillow", "httpx", "prometheus-client", "pytest", "pytest-benchmark", "jinja2", "huggingface_hub"]
CARRIED = ["gguf==0.19.0"]


@pytest.mark.slow
def test_run_gpu_rehearsal(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"

    def pip(*args):
        proc = subprocess.run([str(py), "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]

    pip("install", *IMAGE_PACKAGES)
    wheels = tmp_path / "repo" / ".whl"
    pip("download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), *CARRIED)
    # The script runs in a copy of the checkout, as the device tool sends it (with .whl carried).
    repo = tmp_path / "repo"
    for name in ("smollm3_triton", "kernels", "tests", "bench", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(src, repo / name)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "OUT": str(out), "REHEARSAL": "1",
           "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    log = (out / "run_gpu.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "does not import" not in log, log[-3000:]
    collected = re.findall(r"(\d+)(?:/\d+)? tests collected", log)
    assert len(collected) == 3 and all(int(n) > 0 for n in collected), log[-3000:]
    assert not re.search(r"\berrors? (during collection|in)\b|ImportError|ModuleNotFoundError", log), log[-3000:]
    assert len(list(out.iterdir())) <= 8
