"""`Runtime`: load a model from anywhere, then logits / generate / stream / chat."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import hub
from .chat import render_chat, split_reasoning
from .config import ModelConfig
from .errors import ModelFormatError, RequestError
from .cuda_graph import token_loop_for
from .generation import SamplingParams, check_max_seq_len, check_token_ids
from .model import Transformer
from .tokenizer import StreamDecoder, Tokenizer
from .weights import dequantize_weights, load_gguf, load_safetensors_folder, to_device

# A default context that fits comfortably; the KV cache is allocated for it up front.
DEFAULT_MAX_SEQ_LEN = 8192

# End-of-turn tokens looked up by name in the vocabulary, besides the file's EOS id.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>")


@dataclass(frozen=True)
class ChatResponse:
    content: str
    reasoning: str | None
    text: str            # everything generated, reasoning included

    def __str__(self) -> str:
        return self.content


class Runtime:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: ModelConfig, source: Path,
                 eos_ids: set[int], backend: str = "torch"):
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, config, source
        self.eos_ids = eos_ids
        # CUDA + Triton: CUDA-graph decode with sampling on the GPU; else the eager loop.
        self._token_loop = token_loop_for(model, backend)

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, *, quant: str | None = None, device=None,
             dtype: torch.dtype | str | None = None, backend: str | None = None,
             max_seq_len: int | None = None) -> Runtime:
        """source: a hub repo id, a .gguf path, or a folder with config.json + safetensors
        (None: the packaged SmolLM2-135M-Instruct GGUF)."""
        path = hub.packaged_smollm2() if source is None else hub.resolve(source, quant)
        try:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise RequestError(f"device {device!r} is not a valid device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RequestError(f"device {str(device)!r} asked for, but CUDA is not available here")
        dtype = _dtype(dtype, device)
        backend = backend or ("triton" if device.type == "cuda" else "torch")
        from .kernels import BACKENDS, load_ops
        if backend not in BACKENDS:
            raise RequestError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            # @triton.jit picks compiled or interpreted when the kernels are imported.
            raise RequestError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before "
                               "smollm3_triton is imported (it is set automatically without CUDA)")
        ops = load_ops(backend)

        if path.is_dir():
            config, weights = load_safetensors_folder(path)
            tokenizer = Tokenizer.from_hf_folder(path)
            eos_ids = _generation_config_eos(path)
        else:
            from .gguf_file import GGUFFile
            gguf = GGUFFile(path)
            config, weights = load_gguf(gguf)
            tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
            eos_ids = set()
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelFormatError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{config.vocab_size} embeddings")
        if max_seq_len is None:
            max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        max_seq_len = check_max_seq_len(max_seq_len, config, dtype, device)
        weights = to_device(weights, device)
        if backend == "torch" and device.type == "cpu":
            weights = dequantize_weights(weights, dtype)
        elif backend == "triton":
            from .kernels.triton_ops import prepare_weights
            weights = prepare_weights(weights)
        model = Transformer(config, weights, ops, max_seq_len=max_seq_len, dtype=dtype, device=device)
        eos_ids |= {i for i in [tokenizer.eos_id, *map(tokenizer.token_to_id, END_TOKENS)] if i is not None}
        return cls(model, tokenizer, config, path, eos_ids, backend)

    # ------------------------------------------------------------------ inference
    def logits(self, token_ids) -> torch.Tensor:
        """Logits [T, vocab] float32 of one forward pass over token_ids from position 0."""
        ids = check_token_ids(token_ids, self.config.vocab_size, self.model.max_seq_len)
        dev = self.model.device
        with torch.inference_mode():
            return self.model.forward(ids.to(dev), torch.arange(ids.numel(), device=dev))

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Continue a raw prompt (no template, no BOS), yielding text as it is decoded."""
        params = SamplingParams(**kwargs)
        return self._stream_ids(self._encode(prompt), params)

    def generate(self, prompt: str, **kwargs) -> str:
        """Continue a raw prompt; returns only the new text. temperature=0 is greedy."""
        return "".join(self.stream(prompt, **kwargs))

    def chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None,
             **kwargs) -> ChatResponse:
        """One assistant turn through the file's chat template; reasoning is returned apart."""
        text = "".join(self.stream_chat(messages, thinking=thinking, tools=tools, **kwargs))
        reasoning, content = split_reasoning(text)
        return ChatResponse(content=content, reasoning=reasoning, text=text)

    def stream_chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None,
                    **kwargs) -> Iterator[str]:
        params = SamplingParams(**kwargs)
        return self._stream_ids(self._encode(self.render_chat(messages, thinking=thinking, tools=tools)), params)

    def render_chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None) -> str:
        if not self.tokenizer.chat_template:
            raise RequestError(f"{self.source} carries no chat template; use generate() with a raw prompt")
        return render_chat(self.tokenizer.chat_template, messages, thinking=thinking, tools=tools)

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def _stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        return self.detokenize(self.generate_ids(prompt_ids, params), params.stop)

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """New token ids, the end token included; the request is checked at the call."""
        return self._token_loop(prompt_ids, params, self.eos_ids)

    def detokenize(self, tokens: Iterator[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Decoded text without the end token; cut at the first stop string, holding back
        any tail that could still become one."""
        decoder = StreamDecoder(self.tokenizer)
        pending = ""
        hold = max((len(s) for s in stop), default=1) - 1
        with torch.inference_mode():
            for token in tokens:
                if token in self.eos_ids:
                    break
                pending += decoder.push(token)
                cut = min((i for s in stop if (i := pending.find(s)) >= 0), default=-1)
                if cut >= 0:
                    if pending[:cut]:
                        yield pending[:cut]
                    return
                if len(pending) > hold:
                    yield pending[:len(pending) - hold]
                    pending = pending[len(pending) - hold:]
        pending += decoder.flush()
        cut = min((i for s in stop if (i := pending.find(s)) >= 0), default=len(pending))
        if pending[:cut]:
            yield pending[:cut]


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise RequestError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RequestError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _generation_config_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
