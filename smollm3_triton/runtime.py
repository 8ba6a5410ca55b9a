"""`Runtime`: load a model from anywhere, then logits / generate / stream / chat."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import hub
from .chat import THINK_CLOSE, THINK_OPEN, render_chat
from .chat_parser import ChatTextParser, ToolCall, tool_calls
from .config import ModelConfig
from .engine.engine import Engine
from .engine.outputs import RequestOutput
from .errors import ModelFormatError, RequestError
from .model import Batch, Transformer
from .sampling_params import SamplingParams, StructuredOutputs, check_max_seq_len, check_token_ids
from .tokenizer import Tokenizer
from .tools.perplexity import DEFAULT_CTX, KLDResult, PerplexityResult, kl_divergence, perplexity
from .vision.encoder import VisionModel
from .vision.loader import load_vision
from .vision.prompt import expand_images, split_image_parts, template_takes_parts
from .weights import load_gguf, load_safetensors_folder, to_device

# A default context that fits comfortably; the KV cache is allocated for it up front.
DEFAULT_MAX_SEQ_LEN = 8192

# End-of-turn tokens looked up by name in the vocabulary, besides the file's EOS id.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<end_of_utterance>")


@dataclass(frozen=True)
class ChatResponse:
    content: str
    reasoning: str | None          # the <think> block's text; None when the model did not think
    text: str                      # everything generated, reasoning included
    tool_calls: tuple[ToolCall, ...] = ()   # when the request offered tools and the model called them

    def __str__(self) -> str:
        return self.content


class Runtime:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: ModelConfig, source: Path,
                 eos_ids: set[int], backend: str = "torch", vision: VisionModel | None = None, **engine_options):
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, config, source
        self.vision = vision           # SmolVLM's image encoder, or None for a text-only model
        self.eos_ids = eos_ids
        self.backend = backend
        self.engine = Engine(model, tokenizer, eos_ids, **engine_options)

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, *, quant: str | None = None, device=None,
             dtype: torch.dtype | str | None = None, backend: str | None = None,
             max_seq_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
             kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
             enable_prefix_caching: bool = True, threads: int | None = None,
             mmproj: str | os.PathLike | None = None) -> Runtime:
        """source: a hub repo id, a .gguf path, or a folder with config.json + safetensors
        (None: the packaged SmolLM2-135M-Instruct GGUF). The engine's knobs: max_num_seqs
        sequences run at once, max_num_batched_tokens per step (longer prompts are
        prefilled in chunks), kv_cache_tokens in the paged pool (default: on CUDA
        gpu_memory_utilization of the memory, on the CPU 2 * max_seq_len), and the
        prefix cache. backend: "cpu" (the default on the CPU: 4-bit weights, bf16 matmul
        inputs), "torch" (the exact fp32 reference) or "triton". threads: torch's CPU
        threads (torch.set_num_threads; default: left as it is, one per core unless the
        caller set it).
        mmproj: llama.cpp's vision projector GGUF beside a text GGUF (SmolVLM); a SmolVLM
        folder carries its vision side itself."""
        path = hub.packaged_smollm2() if source is None else hub.resolve(source, quant)
        try:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise RequestError(f"device {device!r} is not a valid device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RequestError(f"device {str(device)!r} asked for, but CUDA is not available here")
        dtype = _dtype(dtype, device)
        from .backends import get_backend
        backend = get_backend(backend or ("triton" if device.type == "cuda" else "cpu"), device, dtype)
        if threads is not None:
            torch.set_num_threads(_threads(threads))

        if path.is_dir():
            config, weights = load_safetensors_folder(path)
            tokenizer = Tokenizer.from_hf_folder(path)
            eos_ids = _generation_config_eos(path)
        else:
            from .gguf.reader import GGUFFile
            gguf = GGUFFile(path)
            config, weights = load_gguf(gguf)
            tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
            eos_ids = set()
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelFormatError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{config.vocab_size} embeddings")
        if max_seq_len is None:
            max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        kv_dtype = backend.kv_dtype or dtype
        max_seq_len = check_max_seq_len(max_seq_len, config, kv_dtype, device)
        weights = backend.prepare_weights(to_device(weights, device))
        model = Transformer(config, weights, backend.ops, max_seq_len=max_seq_len, dtype=dtype, device=device,
                            kv_dtype=kv_dtype)
        vision = load_vision(path, mmproj, config, tokenizer, device, dtype)
        eos_ids |= {i for i in [tokenizer.eos_id, *map(tokenizer.token_to_id, END_TOKENS)] if i is not None}
        rt = cls(model, tokenizer, config, path, eos_ids, backend.name, vision, max_num_seqs=max_num_seqs,
                 max_num_batched_tokens=max_num_batched_tokens, kv_cache_tokens=kv_cache_tokens,
                 gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                 cuda_graphs=backend.cuda_graphs)
        if backend.step_runner is not None:
            rt.engine.runner.forward = backend.step_runner(model, rt.engine.runner.forward)
        return rt

    @property
    def max_seq_len(self) -> int:
        """The context a request's prompt and new tokens must fit in."""
        return self.model.max_seq_len

    # ------------------------------------------------------------------ inference
    def logits(self, token_ids, mm_embeds: list | None = None):
        """Logits [T, vocab] float32 of one forward pass over token_ids from position 0.
        A list of sequences runs as one batch and gives a list of [T_i, vocab].
        mm_embeds (one sequence): encode_chat's image rows, replacing those tokens' embeddings."""
        many = isinstance(token_ids, (list, tuple)) and bool(token_ids) and \
            all(isinstance(x, (list, tuple, torch.Tensor)) for x in token_ids)
        seqs = [check_token_ids(ids, self.config.vocab_size, self.model.max_seq_len)
                for ids in (token_ids if many else [token_ids])]
        with self.engine.exclusive(sum(-(-len(s) // self.engine.block_size) for s in seqs)) as blocks, \
                torch.inference_mode():
            batch = Batch.from_sequences(seqs, blocks, self.engine.block_size, self.model.device)
            if mm_embeds:
                if many:
                    raise RequestError("mm_embeds go with one sequence, not a list of them")
                batch.embeds = torch.cat([e for _, e, _ in mm_embeds])
                batch.embed_rows = torch.tensor([off + k for off, e, _ in mm_embeds for k in range(e.shape[0])],
                                                device=self.model.device)
            out = self.model.forward(batch)
        parts = list(out.split([len(s) for s in seqs]))
        return parts if many else parts[0]

    def perplexity(self, text: str, ctx: int = DEFAULT_CTX, **kwargs) -> PerplexityResult:
        """llama-perplexity's PPL of `text` in chunks of ctx tokens, the chunks batched
        through the engine (chunks, batch_size, kl_divergence_base, progress: see
        perplexity.perplexity)."""
        return perplexity(self, text, ctx, **kwargs)

    def kl_divergence(self, base_file: str | os.PathLike, **kwargs) -> KLDResult:
        """llama-perplexity --kl-divergence: this model against a base file written by
        perplexity(kl_divergence_base=...) or by llama-perplexity itself."""
        return kl_divergence(self, base_file, **kwargs)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Continue a raw prompt (no template, no BOS), yielding text as it is decoded."""
        params = _params(kwargs)
        return self._stream_ids(self._encode(prompt), [], params)

    def generate(self, prompt: str | list[str], **kwargs) -> str | list[str]:
        """Continue a raw prompt; returns only the new text. temperature=0 is greedy.
        A list of prompts runs together (one batch) and gives a list of texts, in order.
        Structured output: json_schema= (a schema dict, or a pydantic model class), regex=,
        choice= (a list of strings), grammar= (GBNF) or structured_outputs=StructuredOutputs(...)."""
        if isinstance(prompt, list):
            params = _params(kwargs)
            return self._run_many([(self._encode(p), [], params) for p in prompt])
        return "".join(self.stream(prompt, **kwargs))

    def chat(self, messages: list[dict] | list[list[dict]], *, thinking: bool | None = None,
             tools: list | None = None, **kwargs) -> ChatResponse | list[ChatResponse]:
        """One assistant turn through the file's chat template; reasoning and tool calls are
        returned apart from the answer. A list of conversations runs together and gives a
        list of responses, in order. response_format= (OpenAI's shape, or a pydantic model
        class) or generate's structured-output arguments constrain the answer; with thinking
        on, the reasoning stays free and the constraint starts after it."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of messages (or of conversations)",
                               param="messages")
        params = _params(kwargs)
        if all(isinstance(m, list) for m in messages):
            prompts = [self.encode_chat(m, thinking=thinking, tools=tools) for m in messages]
            texts = self._run_many([(ids, mm, self._after_reasoning(params, ids)) for ids, mm in prompts])
            return [self._chat_response(ids, text, tools) for (ids, _), text in zip(prompts, texts)]
        ids, mm_embeds = self.encode_chat(messages, thinking=thinking, tools=tools)
        text = "".join(self._stream_ids(ids, mm_embeds, self._after_reasoning(params, ids)))
        return self._chat_response(ids, text, tools)

    def _after_reasoning(self, params: SamplingParams, prompt_ids: list[int]) -> SamplingParams:
        so = params.structured_outputs
        if so is None:
            return params
        return dataclasses.replace(params, structured_outputs=dataclasses.replace(
            so, after=self.reasoning_end(prompt_ids)))

    def stream_chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None,
                    **kwargs) -> Iterator[str]:
        params = _params(kwargs)
        ids, mm_embeds = self.encode_chat(messages, thinking=thinking, tools=tools)
        return self._stream_ids(ids, mm_embeds, self._after_reasoning(params, ids))

    def reasoning_end(self, prompt_ids: list[int]) -> str | None:
        """Where a structured output's constraint starts in this prompt's answer: after
        `</think>` when the model reasons first (the prompt opened a think block, or the
        template has a thinking mode that the prompt did not close: SmolLM3 with thinking on),
        else None (at once)."""
        tail = self.tokenizer.decode(prompt_ids[-8:]).rstrip()
        if tail.endswith(THINK_OPEN) or (THINK_OPEN in (self.tokenizer.chat_template or "")
                                         and not tail.endswith(THINK_CLOSE)):
            return THINK_CLOSE
        return None

    def opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt itself opened a think block (a template that ends its
        generation prompt with <think>): the answer then begins inside the reasoning."""
        return self.tokenizer.decode(prompt_ids[-8:]).rstrip().endswith(THINK_OPEN)

    def chat_parser(self, prompt_ids: list[int], parse_tools: bool = False) -> ChatTextParser:
        """The splitter of this prompt's answer into reasoning, content and tool calls."""
        return ChatTextParser(in_reasoning=self.opens_reasoning(prompt_ids), parse_tools=parse_tools)

    def _chat_response(self, prompt_ids: list[int], text: str, tools: list | None) -> ChatResponse:
        parser = self.chat_parser(prompt_ids, parse_tools=bool(tools))
        deltas = parser.push(text) + parser.finish()
        return ChatResponse(content="".join(d.text for d in deltas if d.kind == "content"),
                            reasoning="".join(d.text for d in deltas if d.kind == "reasoning") if parser.thought
                            else None,
                            text=text, tool_calls=tuple(tool_calls(deltas)))

    def render_chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None,
                    **template_kwargs) -> str:
        if not self.tokenizer.chat_template:
            raise RequestError(f"{self.source} carries no chat template; use generate() with a raw prompt")
        return render_chat(self.tokenizer.chat_template, messages, thinking=thinking, tools=tools,
                           **template_kwargs)

    def encode_chat(self, messages: list[dict], *, thinking: bool | None = None, tools: list | None = None,
                    local_images: bool = True, **template_kwargs) -> tuple[list[int], list]:
        """The prompt ids of a conversation, and the embeddings that replace some of them
        (engine.add_request's mm_embeds: images); the one entry point the server uses.
        A message's content may be OpenAI content parts: text parts are joined; image_url
        parts (a data: URL, or a local path unless local_images is False, as a server sets it)
        need a vision model and become its image tokens."""
        if self.vision is None:
            messages = [_flatten_text_parts(m, i) for i, m in enumerate(messages)]
            return self._encode(self.render_chat(messages, thinking=thinking, tools=tools, **template_kwargs)), []
        messages, urls = split_image_parts(messages, template_takes_parts(self.tokenizer.chat_template or ""))
        text = self.render_chat(messages, thinking=thinking, tools=tools, **template_kwargs)
        return expand_images(self.vision, text, urls, self._encode, local_images)

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def _stream_ids(self, prompt_ids: list[int], mm_embeds: list, params: SamplingParams) -> Iterator[str]:
        return (out.text for out in self.outputs(prompt_ids, params, mm_embeds) if out.text)

    def _run_many(self, requests: list[tuple[list[int], list, SamplingParams]]) -> list[str]:
        """requests: (prompt ids, mm_embeds, params) each."""
        for ids, _, params in requests:
            self.engine.check(len(ids), params)
        results = self.engine.run([(ids, params, mm) for ids, mm, params in requests])
        return ["".join(o.text for o in outs) for outs in results]

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, mm_embeds: list | None = None) -> Iterator[int]:
        """New token ids, the end token included; the request is checked at the call."""
        return (t for out in self.outputs(prompt_ids, params, mm_embeds) for t in out.token_ids)

    def outputs(self, prompt_ids: list[int], params: SamplingParams, mm_embeds: list | None = None
                ) -> Iterator[RequestOutput]:
        """One request's RequestOutputs as the engine steps (new token ids, and their text cut
        at stop strings, end tokens hidden). Refused at the call, not at the first next();
        closing the iterator early aborts the request."""
        request_id = self.engine.add_request(prompt_ids, params, mm_embeds=mm_embeds)
        return self._outputs(request_id)

    def _outputs(self, request_id: str) -> Iterator[RequestOutput]:
        """Step the engine until this request finishes, yielding its outputs; closing the
        iterator early aborts the request."""
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(request_id)


# The Python API's structured-output arguments, each one kind of StructuredOutputs.
_STRUCTURED_ARGS = {"json_schema": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _params(kwargs: dict) -> SamplingParams:
    """SamplingParams from generate / chat's keyword arguments, with the structured-output
    shorthands (json_schema=, regex=, choice=, grammar=, response_format=) folded into one
    StructuredOutputs named after the argument that gave it."""
    kwargs = dict(kwargs)
    given = [k for k in (*_STRUCTURED_ARGS, "response_format", "structured_outputs") if kwargs.get(k) is not None]
    if len(given) > 1:
        raise RequestError(f"{given[1]} cannot be combined with {given[0]}: one output constraint per request",
                           param=given[1])
    for name in list(_STRUCTURED_ARGS) + ["response_format"]:
        value = kwargs.pop(name, None)
        if value is None:
            continue
        if name == "response_format":
            kwargs["structured_outputs"] = StructuredOutputs.from_response_format(value)
        else:
            if name == "json_schema" and isinstance(value, type) and hasattr(value, "model_json_schema"):
                value = value.model_json_schema()
            kwargs["structured_outputs"] = StructuredOutputs(**{_STRUCTURED_ARGS[name]: value}, param=name)
    return SamplingParams(**kwargs)


def _flatten_text_parts(message, i: int):
    """OpenAI content parts [{"type": "text", "text": ...}, ...] as the one string text
    templates expect; any other part type is refused by name."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{i}].content[{j}]: this model takes only text parts "
                               f"({{'type': 'text', 'text': ...}}), got {kind!r}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


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


def _threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise RequestError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def _generation_config_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
