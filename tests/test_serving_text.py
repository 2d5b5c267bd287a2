"""Pure helpers of the serving path: stop strings, request validation messages, error round trips, addresses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeshard.coordinator.cli.serve import parse_http_address
from edgeshard.coordinator.errors import (
    BadRequestError,
    ClusterBusyError,
    ContextLengthError,
    EdgeshardError,
    ModelNotFoundError,
    ServerUnavailableError,
    error_from_body,
)
from edgeshard.coordinator.serving.openai_shapes import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from edgeshard.coordinator.serving.text import StopMatcher, message_text


def _run(stops, pieces):
    m = StopMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        ([], ["Hello", " world"], ("Hello world", False)),
        (["\n\n"], ["a\n", "\nb"], ("a", True)),  # a stop string split across pieces
        (["END"], ["xE", "N", "Dy"], ("x", True)),
        (["END"], ["xE", "N", "d"], ("xENd", False)),  # a held-back prefix that did not become a stop
        (["bc", "b"], ["abcd"], ("a", True)),  # the earliest match wins
        (["", "zz"], ["abc"], ("abc", False)),  # empty stop strings are ignored
    ],
)
def test_stop_matcher(stops, pieces, expected):
    assert _run(stops, pieces) == expected


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopMatcher(["STOP"])
    assert m.feed("abcST") == ("abc", False)  # "ST" could still become STOP
    assert m.feed("x") == ("STx", False)


def test_message_text_joins_text_parts_and_refuses_images():
    assert message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    with pytest.raises(BadRequestError, match="image_url"):
        message_text([{"type": "image_url", "image_url": {"url": "x"}}])


def _error(model, body) -> BadRequestError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value.errors())


def test_validation_errors_name_the_field():
    assert _error(ChatCompletionRequest, {}).param == "messages"
    e = _error(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5})
    assert e.param == "max_tokens" and "greater than or equal to 1" in e.message
    e = _error(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert e.param == "n" and "n must be 1" in e.message
    e = _error(ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]})
    assert e.param == "messages.0.role"
    e = _error(CompletionRequest, {"prompt": "x", "stop": 3})
    assert e.param == "stop"
    e = _error(CompletionRequest, {"prompt": ["a", "b"]})
    assert "one prompt per request" in e.message


def test_chat_request_maps_to_engine_request():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, "stop": "\n", "seed": 3}
    ).to_generation()
    assert (req.max_tokens, list(req.stop), req.seed, req.temperature) == (7, ["\n"], 3, 1.0)
    assert req.messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "error",
    [
        BadRequestError("b", param="x"),
        ContextLengthError("c"),
        ModelNotFoundError("m"),
        ClusterBusyError("busy"),
        ServerUnavailableError("down"),
        EdgeshardError("boom"),
    ],
)
def test_errors_round_trip_through_json(error):
    back = error_from_body(error.status, error.to_dict())
    assert type(back) is type(error)
    assert (back.message, back.param, back.code, back.status) == (
        error.message,
        error.param,
        error.code,
        error.status,
    )


def test_stream_error_events_keep_their_type():
    assert isinstance(error_from_body(None, ServerUnavailableError("down").to_dict()), ServerUnavailableError)


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, ("127.0.0.1", 8000)),
        ("9000", ("127.0.0.1", 9000)),
        (":9000", ("127.0.0.1", 9000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:81", ("::1", 81)),
    ],
)
def test_parse_http_address(text, expected):
    assert parse_http_address(text) == expected


def test_parse_http_address_refuses_garbage():
    with pytest.raises(ValueError, match="host:port"):
        parse_http_address("localhost:http")
