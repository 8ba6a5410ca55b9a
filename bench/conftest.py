import os

import pytest
import torch

# Importing the backends first sets TRITON_INTERPRET=1 when there is no GPU, before any kernel
# module is imported (tests import kernels directly).
import smollm3_triton.backends  # noqa: E402,F401

# The same two threads llama.cpp gets in the comparison benchmarks.
THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)

_FIGURES: list[str] = []


@pytest.fixture
def report_figure():
    """Record a line for the summary printed after the run (shown without -s)."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("bench figures")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    terminalreporter.line(f"machine: {os.cpu_count()} cpu cores, load average (1/5/15 min) {load} at the end, "
                          f"torch threads {torch.get_num_threads()}")
    for line in _FIGURES:
        terminalreporter.line(line)
