"""Byte-level BPE tokenizer built from GGUF metadata or a Hugging Face tokenizer.json.

Encoding runs on the `tokenizers` library; the pre-tokenizer is chosen from the GGUF
`tokenizer.ggml.pre` name so that ids equal llama.cpp's (src/llama-vocab.cpp) for the
same file. Decoding goes through a per-id byte table rather than `tokenizers`' decoder,
so that the streaming decoder can hold back a UTF-8 character split across tokens.
"""

from __future__ import annotations

import codecs
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .errors import GGUFError, ModelFormatError, RequestError, UnsupportedModelError

__all__ = ["Tokenizer", "StreamDecoder", "PRE_TOKENIZER_NAMES"]

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4
_TYPE_BYTE = 6

# The split patterns llama.cpp applies for each pre-tokenizer type. llama.cpp runs the
# patterns of a list one after the other, each on the pieces left by the previous one,
# keeping both the matches and the text between them (`Split(..., "isolated")`).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells the llama3 contractions without (?i:...); the result is the same
# for the ASCII letters involved and avoids Unicode case folding surprises.
_LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_PATTERNS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    _GPT2_PATTERN,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

# pre name -> (split patterns, ignore_merges). ignore_merges mirrors llama.cpp, which
# sets it for the llama3 family only: a pre-token that is itself in the vocabulary is
# emitted whole. SmolLM3's file says "smaug-bpe": same regex, merges always applied.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (_DEFAULT_PATTERNS, False),
    "gpt-2": ((_GPT2_PATTERN,), False),
    # Not a llama.cpp name (it says "gpt-2"), accepted because it is the obvious spelling.
    "gpt2": ((_GPT2_PATTERN,), False),
    "llama3": ((_LLAMA3_PATTERN,), True),
    "llama-v3": ((_LLAMA3_PATTERN,), True),
    "llama-bpe": ((_LLAMA3_PATTERN,), True),
    "smaug-bpe": ((_LLAMA3_PATTERN,), False),
    "dbrx": ((_LLAMA3_PATTERN,), False),
    "smollm": ((r"\p{N}", _GPT2_PATTERN), False),
}
PRE_TOKENIZER_NAMES = tuple(sorted(_PRE_TOKENIZERS))

# Pre-tokenizers for which llama.cpp's vocabulary adds BOS when the file has no
# tokenizer.ggml.add_bos_token key (src/llama-vocab.cpp, BPE branch).
_PRE_ADDING_BOS = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                             "lfm2", "jina-v5-nano", "tekken", "chameleon"})


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (character -> byte)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {ch: b for b, ch in table.items()}


_BYTE_OF_CHAR = _byte_decoder()
_CHAR_OF_BYTE = {b: ch for ch, b in _BYTE_OF_CHAR.items()}
_HEX_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Stands for characters missing from a GGUF vocabulary; a noncharacter, so no real
# token text (byte-level or raw) equals it.
_UNSPELLABLE = "\U0010fffe"


def _byte_level_bytes(token: str) -> bytes:
    # A character outside the table cannot come from byte-level encoding; llama.cpp
    # emits such characters as their UTF-8, and so do we.
    out = bytearray()
    for ch in token:
        b = _BYTE_OF_CHAR.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _pre_tokenizer(patterns: Iterable[str]) -> pre_tokenizers.PreTokenizer:
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
    # The regex splitting is done above; ByteLevel only maps bytes to its alphabet.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _as_list(metadata: dict, key: str, item_type: type) -> list:
    if key not in metadata:
        raise GGUFError(f"GGUF tokenizer metadata lacks {key!r}")
    value = metadata[key]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item_type) for v in value):
        raise GGUFError(f"GGUF key {key!r} should be a list of {item_type.__name__}, got {type(value).__name__}")
    return list(value)


def _optional_id(metadata: dict, key: str, n_vocab: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"GGUF key {key!r} should be an integer token id, got {value!r}")
    if not 0 <= value < n_vocab:
        raise GGUFError(f"GGUF key {key!r} = {value} is outside the vocabulary of {n_vocab} tokens")
    return value


class Tokenizer:
    """Encode text to token ids and decode ids back, as llama.cpp / transformers do.

    `encode` parses special tokens written in the text (``<|im_start|>``) as single
    tokens and adds no BOS. `adds_bos` says whether llama.cpp would put BOS in front of
    a whole text for this vocabulary (llama_vocab_get_add_bos; what llama-perplexity does).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        token_texts: list[str],
        raw_ids: frozenset[int],
        special_ids: frozenset[int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        dropped_id: int | None = None,
        adds_bos: bool = False,
    ):
        self._backend = backend
        # A token's text is byte-level (GPT-2 alphabet) unless its id is in raw_ids
        # (added/special tokens, stored as plain UTF-8). Bytes are worked out on first use.
        self._token_texts = token_texts
        self._raw_ids = raw_ids
        self._bytes_cache: list[bytes | None] = [None] * len(token_texts)
        self._special_ids = special_ids
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.adds_bos = adds_bos
        # Id the backend gives characters the vocabulary cannot spell; encode drops it.
        self._dropped_id = dropped_id

    # ----------------------------------------------------------------- builders

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF key/values (``tokenizer.ggml.*``, ``tokenizer.chat_template``)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        tokens = _as_list(metadata, "tokenizer.ggml.tokens", str)
        merges_raw = _as_list(metadata, "tokenizer.ggml.merges", str)
        n_vocab = len(tokens)
        if "tokenizer.ggml.token_type" in metadata:
            types = _as_list(metadata, "tokenizer.ggml.token_type", int)
            if len(types) != n_vocab:
                raise GGUFError(
                    f"tokenizer.ggml.token_type has {len(types)} entries but tokenizer.ggml.tokens has {n_vocab}"
                )
        else:
            types = [1] * n_vocab

        pre = metadata.get("tokenizer.ggml.pre")
        if pre is None:
            # llama.cpp falls back to its "default" splitter, with a loud warning.
            warnings.warn("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", stacklevel=2)
            pre = "default"
        if pre not in _PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"tokenizer.ggml.pre {pre!r} is not supported; known: {', '.join(PRE_TOKENIZER_NAMES)}"
            )
        patterns, ignore_merges = _PRE_TOKENIZERS[pre]

        merges = []
        for i, merge in enumerate(merges_raw):
            # llama.cpp splits at the first space after the first character.
            cut = merge.find(" ", 1)
            if cut < 0:
                raise GGUFError(f"tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by a space")
            merges.append((merge[:cut], merge[cut + 1 :]))

        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        # A character the vocabulary cannot spell is dropped by llama.cpp after merging,
        # so merges never join its neighbours; tokenizers' BPE, with no unknown token,
        # drops it before merging and does. An unknown token past the vocabulary keeps
        # the neighbours apart, and encode() removes it.
        vocab[_UNSPELLABLE] = n_vocab
        try:
            bpe = BPE(vocab=vocab, merges=merges, unk_token=_UNSPELLABLE, ignore_merges=ignore_merges,
                      fuse_unk=False, byte_fallback=False)
        except Exception as exc:  # tokenizers raises a bare Exception on a merge of unknown tokens
            raise GGUFError(f"GGUF tokenizer merges do not fit its tokens: {exc}") from exc
        backend = _HFTokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(patterns)
        backend.decoder = decoders.ByteLevel()

        special_ids, raw_ids = set(), set()
        specials, user_defined = [], []
        for i, ttype in enumerate(types):
            if ttype in (_TYPE_CONTROL, _TYPE_UNKNOWN, _TYPE_USER_DEFINED):
                # These are stored as raw text, not in the byte-level alphabet.
                tok = tokens[i]
                raw_ids.add(i)
                if tok and vocab[tok] == i:
                    added = AddedToken(tok, special=ttype != _TYPE_USER_DEFINED, normalized=False)
                    (user_defined if ttype == _TYPE_USER_DEFINED else specials).append(added)
                if ttype != _TYPE_USER_DEFINED:
                    special_ids.add(i)
        backend.add_special_tokens(specials)
        backend.add_tokens(user_defined)
        texts = list(tokens)
        for i, ttype in enumerate(types):
            if ttype == _TYPE_BYTE and (m := _HEX_BYTE_TOKEN.fullmatch(tokens[i])):
                # <0xNN> stands for that byte: write it in the byte-level alphabet.
                texts[i] = _CHAR_OF_BYTE[int(m.group(1), 16)]

        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise GGUFError(f"tokenizer.chat_template should be a string, got {type(template).__name__}")
        return cls(
            backend,
            texts,
            frozenset(raw_ids),
            frozenset(special_ids),
            bos_id=_optional_id(metadata, "tokenizer.ggml.bos_token_id", n_vocab),
            eos_id=_optional_id(metadata, "tokenizer.ggml.eos_token_id", n_vocab),
            pad_id=_optional_id(metadata, "tokenizer.ggml.padding_token_id", n_vocab),
            chat_template=template,
            dropped_id=n_vocab,
            adds_bos=_gguf_adds_bos(metadata, pre),
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face folder: tokenizer.json, tokenizer_config.json, chat_template.jinja
        (or a processor's chat_template.json)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelFormatError(f"{folder}: no tokenizer.json")
        try:
            raw = tok_file.read_text(encoding="utf-8")
            spec = json.loads(raw)
            backend = _HFTokenizer.from_str(raw)
        except Exception as exc:
            raise ModelFormatError(f"{tok_file}: cannot be read as a tokenizers file: {exc}") from exc
        model_type = (spec.get("model") or {}).get("type")
        if model_type != "BPE" or not _has_byte_level_decoder(spec.get("decoder")):
            raise UnsupportedModelError(
                f"{tok_file}: only byte-level BPE tokenizers are supported "
                f"(model {model_type!r}, decoder {(spec.get('decoder') or {}).get('type')!r})"
            )

        config: dict = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ModelFormatError(f"{cfg_file}: invalid JSON: {exc}") from exc

        added = backend.get_added_tokens_decoder()
        n_vocab = backend.get_vocab_size(with_added_tokens=True)
        size = max([n_vocab - 1, *added]) + 1
        texts = [added[i].content if i in added else backend.id_to_token(i) or "" for i in range(size)]
        special_ids = frozenset(i for i, t in added.items() if t.special)

        def config_token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            tid = backend.token_to_id(value)
            if tid is None:
                raise ModelFormatError(f"{cfg_file}: {key} {value!r} is not in the vocabulary")
            return tid

        template_file = folder / "chat_template.jinja"
        processor_template = folder / "chat_template.json"    # what processors (SmolVLM) saved before .jinja
        if template_file.is_file():
            # transformers prefers this file over the tokenizer_config entry.
            template = template_file.read_text(encoding="utf-8")
        elif processor_template.is_file():
            from .weights import read_json_object
            template = _config_template(read_json_object(processor_template).get("chat_template"), processor_template)
        else:
            template = _config_template(config.get("chat_template"), cfg_file)

        return cls(
            backend,
            texts,
            frozenset(added),
            special_ids,
            bos_id=config_token_id("bos_token"),
            eos_id=config_token_id("eos_token"),
            pad_id=config_token_id("pad_token"),
            chat_template=template,
            adds_bos=_hf_adds_bos(config, spec),
        )

    # ------------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return len(self._token_texts)

    def token_to_id(self, token: str) -> int | None:
        tid = self._backend.token_to_id(token)
        return None if tid == self._dropped_id else tid

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"encode takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._dropped_id is not None and self._dropped_id in ids:
            ids = [i for i in ids if i != self._dropped_id]
        return ids

    def token_bytes(self, token_id: int, *, skip_special_tokens: bool = False) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise RequestError(f"token id {token_id!r} is outside the vocabulary of {self.vocab_size} tokens")
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        data = self._bytes_cache[token_id]
        if data is None:
            text = self._token_texts[token_id]
            data = text.encode("utf-8") if token_id in self._raw_ids else _byte_level_bytes(text)
            self._bytes_cache[token_id] = data
        return data

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        data = b"".join(self.token_bytes(int(i), skip_special_tokens=skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")


def _gguf_adds_bos(metadata: dict, pre: str) -> bool:
    """llama.cpp's rule: tokenizer.ggml.add_bos_token when the file has it, else the
    default of the (BPE) pre-tokenizer."""
    value = metadata.get("tokenizer.ggml.add_bos_token")
    if value is not None and not isinstance(value, bool):
        raise GGUFError(f"GGUF key 'tokenizer.ggml.add_bos_token' should be a bool, got {value!r}")
    return value if value is not None else pre in _PRE_ADDING_BOS


def _hf_adds_bos(config: dict, spec: dict) -> bool:
    """convert_hf_to_gguf's reading of a folder (gguf-py's SpecialVocab): tokenizer_config's
    add_bos_token, else whether tokenizer.json's post-processor puts the BOS token in front
    of a single sequence."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    post = spec.get("post_processor") or {}
    processors = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for processor in processors:
        if processor.get("type") != "TemplateProcessing" or bos is None:
            continue
        single = processor.get("single") or []
        if single and (single[0].get("SpecialToken") or {}).get("id") == bos:
            return True
    return False


def _has_byte_level_decoder(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        return any(_has_byte_level_decoder(d) for d in decoder.get("decoders", []))
    return False


def _config_template(value: Any, cfg_file: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Older configs hold a list of named templates; "default" is the chat one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise ModelFormatError(f"{cfg_file}: chat_template is neither a string nor a list with a 'default' entry")


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    `push` returns only complete characters: bytes of a UTF-8 sequence split across
    tokens are held until the sequence is whole. `flush` returns what is left (an
    unfinished sequence becomes U+FFFD, as `decode` would make it).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cache = tokenizer._bytes_cache

    def push(self, token_id: int) -> str:
        # The tokenizer's cache first (once per sequence per step); token_bytes checks and fills it.
        cache = self._cache
        data = cache[token_id] if type(token_id) is int and 0 <= token_id < len(cache) and not self._skip else None
        if data is None:
            data = self._tokenizer.token_bytes(token_id, skip_special_tokens=self._skip)
        return self._utf8.decode(data)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
