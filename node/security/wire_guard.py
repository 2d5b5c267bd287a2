"""Requests that do not parse are INVALID_ARGUMENT, not UNKNOWN plus a traceback in the node's log.

gRPC parses a request with the method's deserializer before any handler runs; when the bytes are not a
valid protobuf message it answers UNKNOWN ("Unexpected DecodeError") and logs a full traceback - once per
call, for anyone who can reach the method (any member; in --insecure mode, anyone). `DecodeGuard` hands the
handler raw bytes instead and parses them itself: a corrupt message is refused with INVALID_ARGUMENT and a
rate-limited log line, and a stream is ended the same way at its first corrupt message. Found by
benchmarks/fuzz.py (raw mutated wire messages).

In a request stream the status is set by the handler's own coroutine, never from inside the request
iterator: a handler that reads its requests in another task (Forward's pump) is sending replies meanwhile,
and a status sent from the reading task while a reply is being written fails in gRPC's core
(GRPC_CALL_ERROR_TOO_MANY_OPERATIONS): the caller got INTERNAL, the node logged a traceback, and now and
then the call hung until its deadline. The iterator raises `CorruptRequest` instead; the wrapper turns it
into INVALID_ARGUMENT once the handler has stopped (benchmarks/fuzz.py found it; tests/test_security_wire.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from edgeshard.node.security.call_auth import RateLimitedLog

log = logging.getLogger("edgeshard.node.wire")


class CorruptRequest(Exception):
    """A streamed request that does not parse; becomes INVALID_ARGUMENT in the handler's coroutine."""


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Server side: parses requests itself and refuses corrupt ones with INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.logger = RateLimitedLog(logger=log)
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method or "?"
        parse = handler.request_deserializer
        if not handler.request_streaming:
            behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
            wrapped = self._unary(behavior, parse, method, handler.response_streaming)
            field = "unary_stream" if handler.response_streaming else "unary_unary"
        else:
            behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
            wrapped = self._streaming(behavior, parse, method, handler.response_streaming)
            field = "stream_stream" if handler.response_streaming else "stream_unary"
        return handler._replace(request_deserializer=None, **{field: wrapped})

    def _note(self, context: grpc.aio.ServicerContext, method: str, e: Exception) -> str:
        self.refused += 1
        peer = context.peer() or "unknown peer"
        self.logger.warn(
            peer, "decode", "INVALID_ARGUMENT %s from %s: the request does not parse (%s)", method, peer, e
        )
        return f"{method}: the request is not a valid message ({e})"

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, e: Exception) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._note(context, method, e))

    def _parse_or_refuse(self, parse: Callable, method: str):
        async def one(raw: bytes, context):
            try:
                return parse(raw)
            except (DecodeError, ValueError, TypeError) as e:
                await self._refuse(context, method, e)

        return one

    def _unary(self, behavior, parse: Callable, method: str, streaming_reply: bool):
        one = self._parse_or_refuse(parse, method)
        if streaming_reply:

            async def unary_stream(raw: bytes, context):
                async for reply in behavior(await one(raw, context), context):  # (the node's are generators)
                    yield reply

            return unary_stream

        async def unary_unary(raw: bytes, context):
            return await behavior(await one(raw, context), context)

        return unary_unary

    def _streaming(self, behavior, parse: Callable, method: str, streaming_reply: bool):
        async def requests(raw_iterator: AsyncIterator[bytes], context) -> AsyncIterator:
            async for raw in raw_iterator:
                try:
                    msg = parse(raw)
                except (DecodeError, ValueError, TypeError) as e:
                    raise CorruptRequest(self._note(context, method, e)) from None
                yield msg

        if streaming_reply:

            async def stream_stream(raw_iterator, context):
                try:
                    async for reply in behavior(requests(raw_iterator, context), context):
                        yield reply
                except CorruptRequest as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

            return stream_stream

        async def stream_unary(raw_iterator, context):
            try:
                return await behavior(requests(raw_iterator, context), context)
            except CorruptRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        return stream_unary
