"""TF Serving's REST API on aiohttp (http_rest_api_handler.cc, http_rest_api_util.cc,
http_server.cc): URL grammar, JSON bodies, error layout, CORS, the metrics page, and the
limits that keep one client from hurting the others (RestApi)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from serving import config_files
from serving import json_tensor as jt
from serving import protocol as pr
from serving.core import ServingCore, _Arrival, metadata_proto, status_proto
from serving.settings import ServeConfig

log = logging.getLogger("serving.server")

_V1 = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE)
_ORIGIN = re.compile(r"https?://")  # RE2::PartialMatch(origin_header, "https?://")
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}


def _parse_version(text: str | None) -> int | None:
    if not text:
        return None
    value = int(text)
    if value > pr.INT64_MAX:
        raise pr.invalid(f"Failed to convert version: {text} to numeric.")
    return value


# Bodies larger than this are parsed by the parse thread, with the GIL-friendly reader (see
# RestApi._parse); smaller ones on the loop, where orjson takes a few milliseconds at most.
INLINE_PARSE_BYTES = 256 * 1024


class _TooLarge(Exception):
    """A body (or what it inflates to) is over --max-request-bytes. `drop`: the connection
    must end with the answer (part of the body is still unread, or the client is hostile);
    else aiohttp reads and discards the rest for a short while, so that the client, still
    sending, can read the 413."""

    def __init__(self, message: str, drop: bool = True):
        super().__init__(message)
        self.drop = drop


class RestApi:
    """TF Serving's REST API over a ServingCore: `web_server()` is the aiohttp protocol
    factory to listen with; `handle` answers one request.

    Besides TF Serving's behaviour (see serving/COMPATIBILITY.md), what one client may cost
    the others is bounded: --rest-max-connections connections at once (more get 503 and are
    closed), --rest-idle-timeout-seconds for a connection to send complete request headers,
    --rest-body-timeout-seconds for the body (408), --max-request-bytes for the body after
    gzip (413, then the connection is dropped: inflating stops there, in a thread), and large
    bodies are parsed off the event loop, by one thread, so that memory stays bounded too.
    """

    def __init__(self, core: ServingCore, config: ServeConfig, monitoring: config_files.MonitoringConfig):
        self.core = core
        self.config = config
        self.monitoring = monitoring
        self.cors = _CORS if config.rest_api_enable_cors_support else {}
        # Exactly "application/json", as TF Serving sends it (no charset parameter).
        self._headers = {"Content-Type": "application/json", **self.cors}
        self.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rest-parse")

    def web_server(self) -> Any:
        """The aiohttp low-level server (a protocol factory) answering with `handle`."""
        return _GuardedServer(
            self.handle, max_connections=self.config.rest_max_connections,
            refusal=self._refusal_bytes(),
            # aiohttp closes a connection that has not delivered complete request headers
            # this long after it opened or its last response: idle or trickling alike.
            keepalive_timeout=self.config.rest_idle_timeout_seconds,
            auto_decompress=False,  # gzip is inflated here, within the size limit (_read_body)
            lingering_time=2.0,  # after a 413 for a declared size: read and discard this long at most
            access_log=None,
        )

    def _refusal_bytes(self) -> bytes:
        body = jt.error_json(f"Too many connections: this server accepts at most {self.config.rest_max_connections} "
                             f"at once (--rest-max-connections)").encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body

    def _json(self, status: int, body: str, close: bool = False) -> Any:
        from aiohttp import web

        response = web.Response(status=status, body=body.encode("utf-8", "surrogateescape"), headers=self._headers)
        if close:
            response.force_close()  # "Connection: close", and the connection ends after it
        return response

    async def handle(self, request: Any) -> Any:
        """One HTTP request (aiohttp handler): TF Serving's dispatch (http_server.cc
        RestApiRequestDispatcher, http_rest_api_handler.cc ProcessRequest)."""
        from aiohttp import web

        if self.monitoring.prometheus_enabled and request.path == self.monitoring.prometheus_path:
            return web.Response(text=self.core.metrics.render(), content_type="text/plain")
        # TF Serving matches its patterns against the raw path with the query string.
        path = request.raw_path
        if not _V1.fullmatch(path):
            return web.Response(status=404, text="Not Found", content_type="text/plain")
        started = time.perf_counter()
        model_name, api = "", ""
        close = False
        try:
            with self.core.call():
                if request.method == "OPTIONS":
                    # A CORS preflight (any /v1/ path): OK with an Origin, else
                    # FAILED_PRECONDITION; no body either way.
                    if not _ORIGIN.search(request.headers.get("Origin", "")):
                        self.core.record("", api, "REST", started, "FAILED_PRECONDITION")
                        return web.Response(status=400, headers=self.cors)
                    self.core.record("", api, "REST", started, "OK")
                    return web.Response(status=200, headers=self.cors)
                predict = _PREDICT.fullmatch(path) if request.method == "POST" else None
                status = _STATUS.fullmatch(path) if request.method == "GET" else None
                if predict:
                    model_name, api = unquote(predict.group(1)), predict.group(4).lower()
                    version, label = _parse_version(predict.group(2)), predict.group(3)
                    label = unquote(label) if label else None
                    text = await self._post(request, api, model_name, version, label)
                elif status:
                    model_name = unquote(status.group(1) or "")
                    version, label = _parse_version(status.group(2)), status.group(3)
                    if not model_name:
                        raise pr.invalid("Missing model name in request.")
                    if status.group(4):
                        text = self._metadata(model_name, version, unquote(label) if label else None)
                    else:
                        # GetModelStatus looks at the version only; a label is ignored, as upstream.
                        text = _status_json(self.core.manager.status(model_name, version))
                else:
                    raise pr.invalid(f"Malformed request: {request.method} {path}")
        except _TooLarge as err:
            self.core.record(model_name, api, "REST", started, "RESOURCE_EXHAUSTED")
            # Whatever else the client sends is not read: the connection ends here.
            return self._json(413, jt.error_json(str(err)), close=err.drop)
        except pr.ApiError as err:
            self.core.record(model_name, api, "REST", started, err.code)
            close = self.core.draining or err.http_status == 408
            return self._json(err.http_status, jt.error_json(err.message), close=close)
        except Exception as err:  # a bug or a surprise: still TF Serving's error layout
            log.exception("REST %s %s failed", request.method, path)
            self.core.record(model_name, api, "REST", started, "INTERNAL")
            return self._json(500, jt.error_json(f"Internal error: {type(err).__name__}: {err}"))
        self.core.record(model_name, api, "REST", started, "OK")
        return self._json(200, text, close=self.core.draining)

    async def _post(self, request: Any, method: str, name: str, version: int | None, label: str | None) -> str:
        """:predict, :classify or :regress, within --rest_api_timeout_in_ms."""
        timeout = self.config.rest_api_timeout_in_ms / 1000 or None
        with self.core.arrival() as arrival:
            body = await self._read_body(request)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                    if method == "predict":
                        return await self._predict(name, version, label, body, arrival, deadline)
                    return await self._classify_regress(method, name, version, label, body)
            except TimeoutError:
                raise pr.ApiError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None

    async def _read_body(self, request: Any) -> bytes:
        """The request body, inflated when its Content-Encoding says gzip (as TF Serving's
        evhttp_request.cc does; a body that does not inflate reads as empty, as there).

        Raises _TooLarge past --max-request-bytes (before reading, when Content-Length says
        so; else as soon as the limit is passed, raw or inflated), and ApiError 408 when the
        body takes longer than --rest-body-timeout-seconds to arrive.
        """
        limit = self.config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _TooLarge(f"Request body of {request.content_length} bytes exceeds this server's "
                            f"limit of {limit} bytes (--max-request-bytes)", drop=False)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.rest_body_timeout_seconds):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise _TooLarge(f"Request body exceeds this server's limit of {limit} bytes "
                                        f"(--max-request-bytes)")
                    chunks.append(chunk)
        except TimeoutError:
            raise pr.ApiError("DEADLINE_EXCEEDED", f"Request body not received within "
                              f"{self.config.rest_body_timeout_seconds:g} s (--rest-body-timeout-seconds)",
                              http_status=408) from None
        body = b"".join(chunks)
        if "gzip" in request.headers.get("Content-Encoding", ""):
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.parser, _gunzip, body, limit)
        return body

    async def _parse(self, body: bytes) -> dict:
        """ParseJson, on the loop for small bodies, else in the parse thread with
        rapidjson_compat's reader: its C steps are short (a row of numbers at a time), so
        the loop gets the GIL back every few hundred microseconds, where one orjson call on
        40 MB holds it for seconds."""
        if len(body) <= INLINE_PARSE_BYTES:
            return jt.parse_json(body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.parser, functools.partial(jt.parse_json, body, allow_orjson=False))

    async def _predict(self, name: str, version: int | None, label: str | None, body: bytes,
                       arrival: _Arrival, deadline: float | None) -> str:
        doc = await self._parse(body)
        signature_name = jt.signature_name_of(doc)
        with self.core.manager.acquire(name, version, label) as servable:
            dtypes = servable.input_dtypes(signature_name)  # GetInfoMap, before the tensors
            fill = functools.partial(jt.fill_predict_request, doc, lambda _signature: dtypes,
                                     jt.may_hold_bools(body))
            if len(body) <= INLINE_PARSE_BYTES:
                parsed = fill()
            else:
                parsed = await asyncio.get_running_loop().run_in_executor(self.parser, fill)
            del doc  # the tensors are all that is needed now: free the parsed JSON early
            # The model runs on the loop only for a small request arriving alone (see
            # ServingCore.predict): under load the loop must stay free to read the requests
            # that will share a batch (running them all here gave batches of 1 at 32 clients).
            _signature, outputs = await self.core.predict(
                servable, parsed.signature_name, parsed.tensors, arrival=arrival, deadline=deadline)
        return jt.make_json_from_tensors(outputs, parsed.format)

    async def _classify_regress(self, method: str, name: str, version: int | None, label: str | None,
                                body: bytes) -> str:
        """ProcessClassifyRequest / ProcessRegressRequest: the body's checks first, then the
        servable's signature (see Servable.check_classify_regress)."""
        doc = await self._parse(body)
        signature_name = jt.check_classify_regress_request(doc)
        with self.core.manager.acquire(name, version, label) as servable:
            servable.check_classify_regress(signature_name, method)
        raise AssertionError("check_classify_regress always raises")

    def _metadata(self, name: str, version: int | None, label: str | None) -> str:
        from google.protobuf import json_format

        with self.core.manager.acquire(name, version, label) as servable:
            response = metadata_proto(servable, ["signature_def"])
        from tensorflow_serving.apis import get_model_metadata_pb2

        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        opts = dict(indent=1, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        # The same concatenation as TF Serving's ToJsonString(GetModelMetadataResponse).
        return ('{\n"model_spec":' + json_format.MessageToJson(response.model_spec, **opts) + ",\n"
                '"metadata": {"signature_def": ' + json_format.MessageToJson(signature_map, **opts) + "}\n}\n")


def _status_json(states: list[Any]) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(status_proto(states), indent=1, always_print_fields_with_no_presence=True)



def _gunzip(data: bytes, limit: int) -> bytes:
    """A gzip body inflated (in the parse thread: zlib lets the GIL go), stopping as soon as
    it passes `limit` bytes (_TooLarge): a 1 MB body can inflate to gigabytes. A body that
    is not gzip reads as empty, as TF Serving's UncompressGzipBody leaves it."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pieces, size = [], 0
    try:
        while data:  # 4 MiB at a time: a bomb costs at most the limit, once
            piece = inflater.decompress(data, 4 * 2**20)
            size += len(piece)
            if size > limit:
                raise _TooLarge(f"Request body inflates to more than this server's limit of {limit} bytes "
                                f"(--max-request-bytes)")
            pieces.append(piece)
            data = inflater.unconsumed_tail
        pieces.append(inflater.flush())
    except zlib.error:
        return b""
    return b"".join(pieces)


class _GuardedServer:
    """aiohttp's low-level web.Server with a cap on open connections: past it, a new
    connection gets a 503 answer and is closed, before any of its bytes are read."""

    def __new__(cls, handler: Any, max_connections: int, refusal: bytes, **kwargs: Any) -> Any:
        from aiohttp import web

        class Guarded(web.Server):
            def __init__(self) -> None:
                super().__init__(handler, **kwargs)
                self.open = 0  # counted at accept, before aiohttp's own connection_made

            def __call__(self) -> Any:
                if self.open >= max_connections:
                    return _Refusal(refusal)
                self.open += 1
                return super().__call__()

            def connection_lost(self, protocol: Any, exc: BaseException | None = None) -> None:
                self.open -= 1
                super().connection_lost(protocol, exc)

        return Guarded()


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, then closed. What the client sends
    is read and dropped until it closes (at most 2 s): closing a socket with unread bytes
    would reset the connection, and the client could lose the answer."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        transport.write(self.answer)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(2.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # dropped

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
