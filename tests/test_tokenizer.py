"""Our tokenizer against transformers' tokenizer loaded from the same checkpoint: ids, text, chat prompts, streaming."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hugging Face hub from tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402
from tokenizers import models as tk_models  # noqa: E402
from tokenizers import pre_tokenizers, processors  # noqa: E402

from edgeshard.node.model.config import UnsupportedModelError  # noqa: E402
from edgeshard.node.weights.tokenizer import NoChatTemplateError, Tokenizer, TokenizerLike  # noqa: E402

TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "unicode: naïve café, Ünïcödé, Ελληνικά, русский",
    "emoji: 🦀🚀👍🏽 👨‍👩‍👧 ✨",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장",
    "whitespace   runs\t\ttabs\n\nnewlines\r\n  \n    indented",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "numbers 3.14159 1,000,000 2024-01-01 0x1F 1e-9 -42",
    "  42 and\n\n1. list item",
    "<|im_start|>user\ninjected<|im_end|> and <|endoftext|> inline",
    "I'm sure they've said 'don't' — it's “quoted”…",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文?"},
    ],
    [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def ref(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(ours: Tokenizer, ref, add_special: bool) -> None:
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == ref.encode(text, add_special_tokens=add_special), text
        assert len(ids) >= min(len(text), 1)


def test_decode_matches_transformers(ours: Tokenizer, ref) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids) == text  # byte-level BPE round-trips exactly
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)  # arbitrary ids too: special tokens and lone UTF-8 bytes
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 20))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_special_ids(ours: Tokenizer, ref) -> None:
    assert isinstance(ours, TokenizerLike)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert ours.vocab_size == len(ref) == 49152
    assert (
        ours.add_bos_token is False and ours.encode("hi")[0] != ours.bos_token_id
    )  # GGUF add_bos_token=False
    assert ours.token_to_id("<|im_end|>") == 2 and ours.token_to_id("no such token") is None
    assert (
        ours.stop_token_ids == {ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")} == {0, 2}
    )


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, ref, chat, add_generation_prompt: bool) -> None:
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    expected = ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, return_dict=True)
    assert ours.encode_chat(chat, add_generation_prompt) == list(expected["input_ids"])


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = tok.decode_stream(skip_special_tokens=skip)
    return [dec.step(i) for i in ids] + [dec.flush()]


def test_stream_decoder_concatenates_to_decode(ours: Tokenizer) -> None:
    for text in TEXTS + ["".join(TEXTS)]:
        ids = ours.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # never a broken character
        skipped = _stream(ours, ids, skip=True)
        assert "".join(skipped) == ours.decode(ids, skip_special_tokens=True)


def test_stream_decoder_holds_back_partial_characters(ours: Tokenizer) -> None:
    ids = ours.encode("a🦀b")
    assert len(ids) > 3  # the crab is split into byte tokens
    pieces = _stream(ours, ids)
    assert pieces[0] == "a" and "" in pieces and "🦀" in pieces
    truncated = ids[:2]  # "a" and the first byte(s) of the crab: never completed
    pieces = _stream(ours, truncated)
    assert pieces[:-1] == ["a", ""] and "".join(pieces) == ours.decode(truncated) == "a\ufffd"
    rng = random.Random(1)
    for _ in range(50):  # arbitrary ids, including lone and invalid bytes
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(ours, ids)) == ours.decode(ids)


def test_hf_dir_saved_by_transformers(ours: Tokenizer, ref, tmp_path: Path) -> None:
    ref.save_pretrained(tmp_path)
    hf = Tokenizer.from_checkpoint(tmp_path)
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text)
    assert hf.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert (hf.bos_token_id, hf.eos_token_id, hf.stop_token_ids) == (1, 2, frozenset({0, 2}))


def test_hf_dir_handmade(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot|>": 3, "hello": 4, "world": 5, "!": 6}
    backend = Backend(tk_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "chat_template": [{"name": "default", "template": template}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    # tokenizer.json's post-processor decides BOS; transformers 5 ignores add_bos_token next to a tokenizer.json
    assert tok.encode("hello world !") == ref.encode("hello world !") == [1, 4, 5, 6]
    assert tok.encode("hello", add_special_tokens=False) == [4]
    assert tok.stop_token_ids == {2, 3} and tok.add_bos_token
    chat = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False) == "<s>hello</s>"
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_checkpoint(tmp_path)


def test_chat_template_helpers_and_errors(ours: Tokenizer) -> None:
    tok = Tokenizer(
        ours.backend,
        ours.special_tokens,
        chat_template=(
            "{{ strftime_now('%Y') | length }}{{ messages | tojson }}{% if messages | length > 1 %}"
            "{{ raise_exception('only one message') }}{% endif %}"
        ),
    )
    assert tok.apply_chat_template([{"role": "user", "content": "<é>", "name": None}]) == (
        '4[{"role": "user", "content": "<é>"}]'  # None dropped, no HTML escaping, no ASCII escaping
    )
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="only one message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        Tokenizer(ours.backend, ours.special_tokens).apply_chat_template([{"role": "user", "content": "a"}])


def test_pre_tokenizer_table_matches_transformers() -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from edgeshard.node.weights.tokenizer import _SPLITS

    assert (
        _SPLITS == GGUF_PRE_TOKENIZER_SPLITS
    )  # a new transformers entry means a model we would split differently


def _tiny_gguf(path: Path, tokenizer_model: str) -> None:
    """A SentencePiece-style vocabulary (byte fallback, scores, no merges) in a GGUF, as llama.cpp writes them."""
    w = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "t",
        "▁h",
        "ll",
        "▁he",
        "▁hell",
        "▁hello",
        "▁w",
        "or",
        "▁wor",
        "▁world",
        "lo",
        "▁t",
        "▁the",
        "the",
        "<|im_end|>",
        "<think>",
    ]
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens + pieces)
    w.add_token_scores([0.0] * len(tokens) + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 2) + [3, 4])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens) + len(pieces), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _tiny_gguf(tmp_path / "spm.gguf", "llama")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "spm.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", " hello  the world", "héllo ☃ 🦀", "the<|im_end|>x<think>", "\n\tworld", ""]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert tok.encode("hello")[0] == tok.bos_token_id == 1  # SentencePiece GGUFs add BOS by default
    assert tok.stop_token_ids == {2, tok.token_to_id("<|im_end|>")}


def test_unsupported_gguf_tokenizer_is_named(tmp_path: Path) -> None:
    _tiny_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(UnsupportedModelError, match="GGUF tokenizer model 'bert'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")
