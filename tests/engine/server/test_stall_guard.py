"""StallGuard over a real grpc.aio server and client on a loopback socket: a client that stops
reading is cut off once one write has waited `limit` seconds, a stream that takes longer than
`limit` in total but whose writes each complete is not, and the client's own cancel stays a
cancel."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.errors import SlowConsumerError
from engine.server.stall_guard import StallGuard

METHOD = "/test.Stream/Numbers"
BIG = 2 * 1024 * 1024  # a few of these fill HTTP/2 flow control when the client stops reading


def _serve(handler):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {
        "Numbers": grpc.unary_stream_rpc_method_handler(
            handler, request_deserializer=bytes, response_serializer=bytes)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    return server, port


async def _run(handler, client):
    outcome: dict = {}

    async def recorded(request, context):
        try:
            await handler(request, context, outcome)
        except SlowConsumerError as error:
            outcome["error"] = error
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except BaseException as other:  # the client's cancel: CancelledError or a failed write
            outcome["ended"] = type(other).__name__
            raise

    server, port = _serve(recorded)
    await server.start()
    try:
        options = [("grpc.max_receive_message_length", 4 * BIG)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(METHOD, request_serializer=bytes,
                                        response_deserializer=bytes)(b"")
            await client(call)
    finally:
        await server.stop(None)
    return outcome


def test_a_client_that_stops_reading_is_cut_off_after_the_limit():
    async def handler(request, context, outcome):
        guard = StallGuard(context, 0.3)
        try:
            for _ in range(200):
                await guard.write(b"x" * BIG)
        finally:
            guard.close()
        outcome["finished"] = True

    async def client(call):
        await call.read()
        await asyncio.sleep(2.0)  # stops reading: the server's writes block on flow control
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "read nothing for 0.3 s" in refused.value.details()

    outcome = asyncio.run(_run(handler, client))
    assert isinstance(outcome.get("error"), SlowConsumerError)
    assert "finished" not in outcome


def test_a_stream_longer_than_the_limit_whose_writes_complete_is_not_cut_off():
    async def handler(request, context, outcome):
        guard = StallGuard(context, 0.25)
        try:
            for i in range(12):
                await guard.write(str(i).encode())
                await asyncio.sleep(0.1)  # the pace of generation, not of the client
        finally:
            guard.close()
        outcome["finished"] = True

    async def client(call):
        received = [message async for message in call]
        assert received == [str(i).encode() for i in range(12)]

    outcome = asyncio.run(_run(handler, client))
    assert outcome == {"finished": True}


def test_a_client_cancel_during_a_blocked_write_stays_a_cancel():
    async def handler(request, context, outcome):
        guard = StallGuard(context, 30.0)
        try:
            for _ in range(200):
                await guard.write(b"x" * BIG)
        finally:
            guard.close()

    async def client(call):
        await call.read()
        await asyncio.sleep(0.5)  # the server is blocked in a write by now
        call.cancel()
        await asyncio.sleep(0.5)

    outcome = asyncio.run(_run(handler, client))
    assert "error" not in outcome and "ended" in outcome, outcome
