"""The GGUF format layer: type constants (the leaf), dequantization, the tensors that
hold raw blocks, and the hardened file reader, layered in that order."""
