"""Pure text helpers of the serving path: prompts from requests, and stop strings over streamed text."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2

from edgeshard.coordinator.errors import BadRequestError

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role; templates know "system"


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI content parts of type "text" joined."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise BadRequestError(
                f"content parts of type {kind!r} are not supported; this model reads text only",
                param="messages",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as chat templates expect them: a known role and plain-text content."""
    out = []
    for m in messages:
        role = ROLE_ALIASES.get(m["role"], m["role"])
        out.append(
            {
                **{k: v for k, v in m.items() if v is not None},
                "role": role,
                "content": message_text(m.get("content")),
            }
        )
    return out


def render_prompt(
    tokenizer: Any, prompt: str | Sequence[int] | None, messages: Sequence[Mapping] | None
) -> list[int]:
    """Token ids of a completion prompt (text or ids) or of chat messages through the model's chat template.

    A text prompt gets BOS as the checkpoint asks; a rendered chat prompt does not (the template wrote it).
    """
    if messages is not None:
        try:
            text = tokenizer.apply_chat_template(normalize_messages(messages), add_generation_prompt=True)
        except (
            ValueError,
            LookupError,
            TypeError,
            jinja2.TemplateError,
        ) as e:  # no template, or it refused them
            raise BadRequestError(f"cannot render the chat messages: {e}", param="messages") from None
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt is None:
        raise BadRequestError("give a prompt (completions) or messages (chat)", param="prompt")
    return [int(i) for i in prompt]


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back only what could still become one.

    `feed(piece)` returns the text that is safe to emit and whether a stop string was found (the text before
    it is returned, the stop string and everything after are dropped). `flush()` returns what was held back.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; (text to emit now, stop string found)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[: min(found)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back tail (generation ended without a stop string)."""
        held, self.held = self.held, ""
        return held
