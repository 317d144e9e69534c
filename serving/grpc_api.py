"""TF Serving's gRPC API on grpc.aio: PredictionService (Predict, GetModelMetadata) and
ModelService (GetModelStatus), following prediction_service_impl.cc, model_service_impl.cc
and grpc_status_util.cc."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

import numpy as np

from serving import protocol as pr
from serving import tensor_proto
from serving.core import ServingCore, metadata_proto, status_proto
from serving.settings import ServeConfig

log = logging.getLogger("serving.server")

GRPC_MESSAGE_LIMIT = 1024  # ToGRPCStatus truncates longer messages


def _spec_choice(spec: Any) -> tuple[int | None, str | None]:
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return int(spec.version.value), None
    if which == "version_label":
        return None, spec.version_label
    return None, None


def _grpc_spec(request: Any) -> tuple[int | None, str | None]:
    if not request.HasField("model_spec"):
        raise pr.invalid("Missing ModelSpec")
    return _spec_choice(request.model_spec)


def _grpc_inputs(request: Any, servable: Any, signature_key: str, max_bytes: int) -> dict[str, np.ndarray]:
    """GetInputValues' decoding (tensorflow/cc/saved_model/util.cc): each input as numpy,
    "tensor parsing error: <alias>" where Tensor::FromProto would fail, the signature's
    default for an input left out. Before anything is decoded, the decoded size of all of
    them is checked against `max_bytes` (--max-tensor-bytes): RESOURCE_EXHAUSTED, never an
    allocation of what a tiny message can declare."""
    total = 0
    for alias, proto in request.inputs.items():
        try:
            total += tensor_proto.decoded_bytes(proto)
        except (tensor_proto.TensorProtoError, ValueError):
            raise pr.invalid(f"tensor parsing error: {alias}") from None
    if total > max_bytes:
        raise pr.ApiError("RESOURCE_EXHAUSTED", f"Request input tensors would take {total} bytes once decoded, "
                          f"more than this server's limit of {max_bytes} bytes (--max-tensor-bytes)")
    inputs = {}
    for alias, proto in request.inputs.items():
        try:
            inputs[alias] = tensor_proto.to_ndarray(proto)
        except (tensor_proto.TensorProtoError, ValueError):
            raise pr.invalid(f"tensor parsing error: {alias}") from None
    defaults = getattr(servable.signatures[signature_key], "defaults", {})
    for alias in set(defaults) - set(inputs):
        inputs[alias] = tensor_proto.to_ndarray(defaults[alias], max_bytes)
    return inputs


def _grpc_response(response: Any, name: str, servable: Any, signature: str,
                   outputs: Mapping[str, np.ndarray]) -> Any:
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature
    for alias, value in outputs.items():
        tensor_proto.fill(response.outputs[alias], value, as_fields=True)
    return response


def _grpc_status(err: pr.ApiError) -> tuple[Any, str]:
    import grpc

    message = err.message
    if len(message) > GRPC_MESSAGE_LIMIT:
        message = message[:GRPC_MESSAGE_LIMIT] + "...TRUNCATED"
    return getattr(grpc.StatusCode, err.code), message


def build_grpc_server(core: ServingCore, config: ServeConfig) -> Any:
    """A grpc.aio server with PredictionService and ModelService (not started), on the
    event loop that also runs the REST API.

    Predict requests go through the same loop hand-off as REST ones: those that arrive in
    one loop iteration are queued together and share a batch, and results come back with
    one loop wake-up per burst. Measured on the 2-core reference machine, grpc's threaded
    server spent about twice the CPU per call at 32 clients (GIL hand-offs between handler
    threads). --grpc-max-concurrent, when set, bounds the calls in progress at once.
    """
    import grpc
    from tensorflow_serving.apis import (
        model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
    )

    async def abort(context: Any, err: pr.ApiError) -> None:
        await context.abort(*_grpc_status(err))  # raises

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):  # noqa: N802 - gRPC method name
            started = time.perf_counter()
            name = request.model_spec.name
            try:
                with core.call():
                    version, label = _grpc_spec(request)
                    with core.arrival() as arrival, core.manager.acquire(name, version, label) as servable:
                        key = servable.check_inputs(request.model_spec.signature_name, request.inputs)
                        inputs = _grpc_inputs(request, servable, key, config.max_tensor_bytes)
                        # No timer of our own: grpc.aio cancels this coroutine at the call's
                        # deadline (or when the client cancels), which cancels a model run
                        # that has not started (a timer per call cost 6% of the loop's time
                        # at 32 clients); the deadline also goes into the run, which
                        # TensorFlow stops there.
                        remaining = context.time_remaining()
                        signature, outputs = await core.predict(
                            servable, request.model_spec.signature_name, inputs,
                            list(request.output_filter), arrival=arrival, gather=True,
                            deadline=None if remaining is None else time.monotonic() + remaining)
                        response = _grpc_response(predict_pb2.PredictResponse(), name, servable, signature, outputs)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                core.record(name, "Predict", "GRPC", started,
                            "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
                raise
            except pr.ApiError as err:
                core.record(name, "Predict", "GRPC", started, err.code)
                await abort(context, err)
            except Exception as err:
                log.exception("gRPC Predict failed")
                core.record(name, "Predict", "GRPC", started, "INTERNAL")
                await abort(context, pr.ApiError("INTERNAL", f"Internal error: {type(err).__name__}: {err}"))
            core.record(name, "Predict", "GRPC", started, "OK")
            return response

        async def Classify(self, request, context):  # noqa: N802
            await self._classify_regress(request, context, "classify")

        async def Regress(self, request, context):  # noqa: N802
            await self._classify_regress(request, context, "regress")

        async def _classify_regress(self, request: Any, context: Any, method: str) -> None:
            """TensorflowClassificationServiceImpl::Classify / ...RegressionServiceImpl::
            Regress up to the signature checks (Servable.check_classify_regress, which ends
            in UNIMPLEMENTED for a signature that passes them)."""
            started = time.perf_counter()
            name = request.model_spec.name
            try:
                with core.call():
                    version, label = _grpc_spec(request)
                    with core.manager.acquire(name, version, label) as servable:
                        servable.check_classify_regress(request.model_spec.signature_name, method)
            except pr.ApiError as err:
                core.record(name, method.capitalize(), "GRPC", started, err.code)
                await abort(context, err)

        async def GetModelMetadata(self, request, context):  # noqa: N802
            name = request.model_spec.name
            try:
                with core.call():
                    version, label = _grpc_spec(request)
                    if not list(request.metadata_field):
                        raise pr.invalid("GetModelMetadataRequest must specify at least one metadata_field")
                    with core.manager.acquire(name, version, label) as servable:
                        response = metadata_proto(servable, list(request.metadata_field))
            except pr.ApiError as err:  # (TF Serving counts no metadata calls)
                await abort(context, err)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        async def GetModelStatus(self, request, context):  # noqa: N802
            try:
                with core.call():
                    version, _label = _grpc_spec(request)
                    return status_proto(core.manager.status(request.model_spec.name, version))
            except pr.ApiError as err:
                await abort(context, err)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        maximum_concurrent_rpcs=config.grpc_max_concurrent or None,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    return server

