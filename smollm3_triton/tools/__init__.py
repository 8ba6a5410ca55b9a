"""Tools over a loaded model: perplexity and KL divergence as llama-perplexity computes them,
and the prefill / decode bench beside its roofline.

The perplexity defaults and limits live here, where the CLI reads them for its help without importing torch.
"""

DEFAULT_CTX = 512               # tokens per chunk, llama-perplexity's -c default
DEFAULT_BATCH = 2048            # tokens per forward call, llama-perplexity's -b default
MIN_CTX = 3                     # the shortest chunk with a scored token
