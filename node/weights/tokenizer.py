"""The tokenizer and chat template of a checkpoint, built from the checkpoint itself.

A GGUF file carries no `tokenizer.json`: its vocabulary, merges and special ids are metadata under llama.cpp's key
names. `Tokenizer.from_gguf` rebuilds a `tokenizers.Tokenizer` from them the same way transformers' GGUF loader
does (transformers 5.x, `integrations/gguf/gguf_tokenizer_mapping.py`), so token ids match what transformers
produces for the same file. A Hugging Face directory is read from its `tokenizer.json` and `tokenizer_config.json`.
Chat templates render in a sandboxed jinja2 environment set up like transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from edgeshard.node.errors import EdgeshardError
from edgeshard.node.model.config import UnsupportedModelError

# Tokens that end a turn or a document in common chat formats; each is a stop token when the vocabulary has it
# as a special token (ChatML, Llama 3, Gemma, Phi-3, SentencePiece).
END_TOKENS = tuple(
    "<|im_end|> <|eot_id|> <|eom_id|> <|endoftext|> <|end_of_text|> <end_of_turn> <|end|> </s>".split()
)
# GGUF metadata keys (under tokenizer.ggml.) of the named special tokens
_GGUF_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as transformers maps them. Values not listed (e.g. "smollm",
# "default", "gpt-2") keep the GPT-2 pattern of ByteLevel, which is also what transformers does.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UP, _LO = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_C = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_C}|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_C}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    pre: regex
    for names, regex in (
        (
            "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe",
            _LLAMA3,
        ),
        ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez", _QWEN2),
        ("gpt-4o llama4 kanana2 talkie minimax-m2", _GPT4O),
        ("qwen35", _QWEN35),
        ("tekken", _TEKKEN),
    )
    for pre in names.split()
}
# SentencePiece vocabularies of these architectures need builders transformers has and we do not.
_SPM_UNSUPPORTED_ARCHS = ("phi3",)
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


@runtime_checkable
class TokenizerLike(Protocol):
    """What the rest of edgeshard needs from a tokenizer (lets tests and servers substitute their own)."""

    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def stop_token_ids(self) -> frozenset[int]: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def decode_stream(self, skip_special_tokens: bool = False) -> StreamDecoder: ...


class NoChatTemplateError(EdgeshardError, ValueError):
    """The checkpoint has no chat template, so chat messages cannot be rendered into a prompt."""


class StreamDecoder:
    """Turns generated token ids, fed one at a time, into text pieces whose concatenation equals `decode(ids)`.

    A character can span several tokens (byte-level BPE splits emoji and CJK into bytes), so a piece is held back
    while the decoded tail ends in U+FFFD. Each step decodes only a short window: the tokens since the last emitted
    piece plus that piece's tokens as context (for decoders that strip a leading space at the start of a text).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: first token of the last emitted piece
        self._read = 0  # tokens before this index have been emitted

    def _window(self) -> tuple[str, str]:
        seen = self._backend.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        return seen, self._backend.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one generated id; return the newly complete text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        seen, text = self._window()
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]

    def flush(self) -> str:
        """Return whatever is held back at the end of generation (incomplete bytes decode to U+FFFD, as in decode)."""
        seen, text = self._window()
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by training templates) and renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, **kwargs: Any) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt; transformers overrides it the same way
    return json.dumps(x, ensure_ascii=ensure_ascii, **kwargs)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet byte-level vocabularies use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes map to code points from 256 on, in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs), strict=True))


def _template_processor(special: Mapping[str, str], backend: Backend, add_bos: bool, add_eos: bool) -> Any:
    """The post-processor transformers builds for `add_bos_token`/`add_eos_token` (dropped when the token is unset)."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _add_named_specials(backend: Backend, special: Mapping[str, str]) -> None:
    # transformers adds the named special tokens (bos/eos/unk/pad) as special added tokens when they are not yet,
    # e.g. a SentencePiece `<unk>`, so they are matched whole in text and skipped by skip_special_tokens
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in special.values() if t not in present]
    if missing:
        backend.add_tokens(missing)


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, chat template, and the ids that start and stop generation."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, str],
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}  # template variables
        self.chat_template = chat_template
        # eos ids from the model config; the first one serves as eos when the tokenizer names none
        self._eos_ids = [int(i) for i in eos_token_ids]

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer of a .gguf file or a Hugging Face directory."""
        p = Path(path)
        if p.is_file():
            return cls.from_gguf(p)
        if p.is_dir():
            return cls.from_hf_dir(p)
        raise FileNotFoundError(f"no checkpoint at {p}: expected a .gguf file or a Hugging Face directory")

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata (a path, an open `GGUFFile` or `gguf.GGUFReader`)."""
        if isinstance(path_or_reader, (str, Path)):
            from edgeshard.node.weights.gguf_file import GGUFFile

            path_or_reader = GGUFFile(path_or_reader)
        meta = lambda key, default=None: _gguf_field(path_or_reader, key, default)  # noqa: E731
        model, arch = meta("tokenizer.ggml.model"), meta("general.architecture")
        tokens: list[str] = meta("tokenizer.ggml.tokens") or []
        merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges") or []]
        if model == "gpt2":
            spelling = _bytes_to_unicode()
            alphabet = set(spelling.values())
            # llama.cpp stores some tokens as plain text; the byte-level vocabulary needs them in the byte alphabet
            vocab = {
                t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
                for i, t in enumerate(tokens)
            }
            bpe_options = {"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False}
            backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, **bpe_options))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        elif model == "llama" and arch in _GEMMA_ARCHS:
            backend = _gemma_backend(tokens, meta("tokenizer.ggml.unknown_token_id"))
        elif model == "llama" and arch not in _SPM_UNSUPPORTED_ARCHS:
            vocab = {t: i for i, t in enumerate(tokens)}
            if not merges:  # most SentencePiece GGUFs list no merges: derive them from the scores, best first
                merges = _merges_from_scores(
                    vocab, dict(zip(tokens, meta("tokenizer.ggml.scores") or [], strict=False))
                )
            backend = Backend(
                BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
            )
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first", split=False
            )
            pieces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            backend.decoder = decoders.Sequence([*pieces, decoders.Strip(content=" ", left=1)])
        else:
            raise UnsupportedModelError(
                f"GGUF tokenizer model {model!r} (architecture {arch!r}) is not supported; supported: 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece BPE). Use a Hugging Face directory with tokenizer.json."
            )
        types = meta("tokenizer.ggml.token_type") or []
        byte_alphabet = set(_bytes_to_unicode().values()) if model == "gpt2" else None
        # 3 = CONTROL: special tokens; a byte-level "control" token outside the byte alphabet is a llama.cpp mislabel
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types, strict=False)
            if ty == 3 and (byte_alphabet is None or set(t) <= byte_alphabet)
        ]
        backend.add_special_tokens(control)
        known = backend.get_vocab()
        # 4 = USER_DEFINED: added but not special (e.g. `<think>`); llama.cpp matches these whole in text
        backend.add_tokens(
            [
                AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == 4 and t in known
            ]
        )
        if (split := _SPLITS.get(meta("tokenizer.ggml.pre"))) is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        special = {}
        for name, key in _GGUF_SPECIAL_IDS.items():
            token_id = meta(f"tokenizer.ggml.{key}")
            if token_id is not None and 0 <= token_id < len(tokens):
                special[name] = tokens[token_id]
        _add_named_specials(backend, special)
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        add_bos = bool(meta("tokenizer.ggml.add_bos_token", model == "llama"))
        backend.post_processor = _template_processor(
            special, backend, add_bos, bool(meta("tokenizer.ggml.add_eos_token", False))
        )
        eos_ids = [meta(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(backend, special, meta("tokenizer.chat_template"), [i for i in eos_ids if i is not None])

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer of a Hugging Face directory (tokenizer.json, tokenizer_config.json, configs)."""
        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{d} has no tokenizer.json (slow SentencePiece/tiktoken files are not supported); convert it once "
                "with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        backend = Backend.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        special = {}
        for name in _GGUF_SPECIAL_IDS:
            value = cfg.get(name)
            value = value.get("content") if isinstance(value, dict) else value  # serialized AddedToken
            if isinstance(value, str):
                special[name] = value
        _add_named_specials(backend, special)
        # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 ignores add_bos_token/add_eos_token
        # in tokenizer_config.json when a tokenizer.json exists
        template = cfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():  # transformers 5 saves the template as its own file
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(d / name).get("eos_token_id")
            eos_ids += [value] if isinstance(value, int) else list(value or [])
        return cls(backend, special, template, eos_ids)

    # ---- ids ----------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. "<|im_end|>"), or None when the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None when out of range."""
        return self.backend.id_to_token(token_id)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None when the model has none."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id the tokenizer names, else the first one the model config lists."""
        named = self._special_id("eos_token")
        return named if named is not None else next(iter(self._eos_ids), None)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, the config's eos ids, and end-of-turn/text tokens that are special here."""
        ids = set(self._eos_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        specials = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids.update(specials[t] for t in END_TOKENS if t in specials)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model's embedding may have more rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` prepends BOS."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    # ---- text ---------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") become their ids.

        `add_special_tokens` adds BOS/EOS only as the checkpoint asks. Encode a rendered chat prompt with
        `add_special_tokens=False` (as transformers does): the template already wrote any BOS it wants.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (invalid or incomplete UTF-8 becomes U+FFFD)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generation."""
        return StreamDecoder(self, skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise NoChatTemplateError(
                "this checkpoint has no chat template; send a plain prompt instead of messages"
            )
        return _compile_template(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render chat messages into the prompt text the model was trained on (as transformers renders it)."""
        chat = []
        for message in messages:
            # like transformers: None values are dropped (templates test for missing keys, not None) and reasoning
            # given under an older name is also offered as `reasoning_content` and `thinking`
            m = {k: v for k, v in dict(message).items() if v is not None}
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            chat.append(
                m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning}
            )
        variables = {**self.special_tokens, **kwargs}
        template_vars = {"tools": tools, "documents": None, "add_generation_prompt": add_generation_prompt}
        return self._template.render(messages=chat, **template_vars, **variables)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat prompt, ready to feed the model."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


def _gemma_backend(tokens: list[str], unk_id: int | None) -> Backend:
    """Gemma's SentencePiece BPE as transformers rebuilds it from a GGUF (`gemma_tokenizer` and
    `GemmaTokenizer`): tokens of two or more spaces respelled with "▁", merges derived from the vocabulary
    ranked by the tokens' order in the file (Gemma's scores do not follow its merge order), spaces
    normalized to "▁" and split after each one, no prefix space."""
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(vocab, {t: -i for i, t in enumerate(tokens)})
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True, dropout=None)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every split of a token into two known pieces,
    ranked by the token's score (transformers' `generate_merges`, so the order matches it exactly)."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)
