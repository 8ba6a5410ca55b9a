# The package first, before any bench imports torch: its process-wide setting (libgomp's
# bounded spin, smollm3_triton/__init__.py) must be in place when torch loads libgomp, so
# that a bench times what `smollm3` and `smollm3 serve` run.
import smollm3_triton  # noqa: F401
