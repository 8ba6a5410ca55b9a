"""The CPU time a refusal costs the code under test, and nothing else the process does."""
import gc
import time
from contextlib import contextmanager


class CpuSeconds:
    seconds = 0.0


@contextmanager
def own_cpu_seconds():
    """Time the block in this thread's CPU seconds, with the cyclic garbage collector paused.

    Neither wall time (the test machines are shared) nor the process's CPU time (threads an
    earlier test left in the process run beside us): CI once charged a 3 ms GGUF refusal 471 ms.
    A full collection of the objects earlier tests left alive (models, tokenizers) can take
    that long too, and it is not the parser's cost.
    """
    timer = CpuSeconds()
    collecting = gc.isenabled()
    gc.disable()
    start = time.thread_time()
    try:
        yield timer
    finally:
        timer.seconds = time.thread_time() - start
        if collecting:
            gc.enable()
