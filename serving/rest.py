"""TF Serving's REST API on aiohttp (http_rest_api_handler.cc, http_rest_api_util.cc,
http_server.cc): URL grammar, JSON bodies, error layout, CORS, the metrics page."""

from __future__ import annotations

import asyncio
import logging
import re
import time
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


class RestApi:
    def __init__(self, core: ServingCore, config: ServeConfig, monitoring: config_files.MonitoringConfig):
        self.core = core
        self.config = config
        self.monitoring = monitoring
        # Exactly "application/json", as TF Serving sends it (no charset parameter).
        self._headers = {"Content-Type": "application/json",
                         **(_CORS if config.rest_api_enable_cors_support else {})}

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _json(self, status: int, body: str) -> Any:
        from aiohttp import web

        return web.Response(status=status, body=body.encode("utf-8"), headers=self._headers)

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        if self.monitoring.prometheus_enabled and request.path == self.monitoring.prometheus_path:
            return web.Response(text=self.core.metrics.render(), content_type="text/plain")
        # TF Serving matches its patterns against the raw path with the query string.
        path = request.raw_path
        if not _V1.fullmatch(path):
            return web.Response(status=404, text="Not Found", content_type="text/plain")
        if request.method == "OPTIONS" and self.config.rest_api_enable_cors_support:
            return web.Response(status=200, headers=_CORS)
        started = time.perf_counter()
        model_name, api = "", "unknown"
        try:
            predict = _PREDICT.fullmatch(path) if request.method == "POST" else None
            status = _STATUS.fullmatch(path) if request.method == "GET" else None
            if predict:
                model_name, api = unquote(predict.group(1)), predict.group(4).lower()
                version, label = _parse_version(predict.group(2)), predict.group(3)
                with self.core.arrival() as arrival:
                    body = await self._read_body(request)
                    if api != "predict":
                        raise pr.ApiError("UNIMPLEMENTED", f"this server implements :predict only, not :{api}")
                    timeout = self.config.rest_api_timeout_in_ms / 1000 or None
                    try:
                        async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                            text = await self._predict(
                                model_name, version, unquote(label) if label else None, body, arrival)
                    except TimeoutError:
                        raise pr.ApiError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
            elif status:
                model_name = unquote(status.group(1) or "")
                version, label = _parse_version(status.group(2)), status.group(3)
                if not model_name:
                    raise pr.invalid("Missing model name in request.")
                if status.group(4):
                    api = "GetModelMetadata"
                    text = self._metadata(model_name, version, unquote(label) if label else None)
                else:
                    api = "GetModelStatus"
                    # GetModelStatus looks at the version only; a label is ignored, as upstream.
                    text = _status_json(self.core.manager.status(model_name, version))
            else:
                raise pr.invalid(f"Malformed request: {request.method} {path}")
        except pr.ApiError as err:
            self.core.record(model_name, api, "REST", started, err.code)
            return self._json(err.http_status, jt.error_json(err.message))
        except Exception as err:  # a bug or a surprise: still TF Serving's error layout
            log.exception("REST %s %s failed", request.method, path)
            self.core.record(model_name, api, "REST", started, "INTERNAL")
            return self._json(500, jt.error_json(f"Internal error: {type(err).__name__}: {err}"))
        self.core.record(model_name, api, "REST", started, "OK")
        return self._json(200, text)

    async def _read_body(self, request: Any) -> bytes:
        from aiohttp import web

        limit = self.config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise pr.ApiError("RESOURCE_EXHAUSTED",
                              f"Request body of {request.content_length} bytes exceeds this server's "
                              f"limit of {limit} bytes (--max-request-bytes)", http_status=413)
        try:
            return await request.read()  # gzip'd bodies arrive decompressed, as in TF Serving
        except web.HTTPRequestEntityTooLarge:
            raise pr.ApiError("RESOURCE_EXHAUSTED",
                              f"Request body exceeds this server's limit of {limit} bytes "
                              f"(--max-request-bytes)", http_status=413) from None

    async def _predict(self, name: str, version: int | None, label: str | None, body: bytes,
                       arrival: _Arrival) -> str:
        doc = jt.parse_json(body)
        jt.signature_name_of(doc)
        with self.core.manager.acquire(name, version, label) as servable:
            parsed = jt.fill_predict_request(doc, servable.input_dtypes, jt.may_hold_bools(body))
            # The model runs on the loop only for a small request arriving alone (see
            # ServingCore.predict): under load the loop must stay free to read the requests
            # that will share a batch (running them all here gave batches of 1 at 32 clients).
            _signature, outputs = await self.core.predict(
                servable, parsed.signature_name, parsed.tensors, arrival=arrival)
        return jt.make_json_from_tensors(outputs, parsed.format)

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

