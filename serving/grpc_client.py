"""Query TensorFlow Serving (or the local server) over gRPC, with tensorflow-serving-api.

    from serving.grpc_client import GrpcClient
    with GrpcClient("localhost:8500") as client:
        client.status()                        # same layout as the REST status JSON
        prediction = client.predict(images)    # uint8 [N, 28, 28]
        prediction.model_version               # which version answered

Same checks, errors, exit codes and retry rules as the REST client (serving/client.py):
UNAVAILABLE is retried with backoff; every other status surfaces at once with the server's
own message; large inputs go in requests of at most max_batch_size images, as with REST.
The channel's message size limits are raised (256 MiB by default; gRPC's
default of 4 MiB refuses a few thousand images). Tensors are packed with numpy
(serving/tensor_proto.py) rather than tf.make_tensor_proto.

tensorflow-serving-api's protos import the `tensorflow` package, so this client needs
TensorFlow installed; it is imported when a client is made, not when this module is.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from common import contract
from serving import tensor_proto
from serving.client import (
    DEFAULT_GRPC_TARGET, DEFAULT_MAX_BATCH_SIZE, DeadlineExceeded, InputError, ModelClient,
    Prediction, RequestRejected, RetryPolicy, ServerFailure, TensorSpec, UnreachableError,
    check_tensor, join_predictions, prediction_from_outputs, request_slices,
    signatures_from_metadata, with_retries,
)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20

# gRPC codes the client caused (REST would say 4xx).
_REJECTED = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
             "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
             "ABORTED", "CANCELLED"}


class GrpcClient(ModelClient):
    """PredictionService + ModelService for one model (optionally one version or label)."""

    def __init__(self, target: str = DEFAULT_GRPC_TARGET, model: str = contract.MODEL_NAME,
                 version: int | None = None, label: str | None = None, timeout: float = 10.0,
                 retry: RetryPolicy = RetryPolicy(),
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        import grpc
        from tensorflow.core.framework import tensor_pb2
        from tensorflow_serving.apis import (
            get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
            prediction_service_pb2_grpc,
        )

        if version is not None and label is not None:
            raise InputError("give a version or a label, not both")
        request_slices(0, max_batch_size)  # validates it
        self.max_batch_size = max_batch_size
        self.target = target
        self.model, self.version, self.label = model, version, label
        self.timeout = timeout
        self.retry = retry
        self._grpc = grpc
        self._pb = {"meta": get_model_metadata_pb2, "status": get_model_status_pb2,
                    "predict": predict_pb2, "tensor": tensor_pb2.TensorProto}
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signatures: dict[str, Any] | None = None

    def close(self) -> None:
        self._channel.close()

    # -- transport ---------------------------------------------------------------------------
    def _spec(self, spec: Any, signature: str = "") -> None:
        spec.name = self.model
        if self.version is not None:
            spec.version.value = int(self.version)
        elif self.label is not None:
            spec.version_label = self.label
        if signature:
            spec.signature_name = signature

    def _call(self, method: Any, request: Any, what: str) -> Any:
        grpc = self._grpc

        def once() -> Any:
            return method(request, timeout=self.timeout)

        def retryable(err: Exception) -> float | None:
            if isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE:
                return 0.0
            return None

        try:
            return with_retries(once, retryable, self.retry)
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""
            text = f"{what} on {self.target}: {code}: {details}"
            if code == "UNAVAILABLE":
                if "connect" in details.lower() or "refused" in details.lower():
                    raise UnreachableError(f"cannot reach {self.target}: {details}") from None
                raise ServerFailure(text, code, details) from None
            if code == "DEADLINE_EXCEEDED":
                raise DeadlineExceeded(f"{what} on {self.target}: no answer within {self.timeout:g} s ({details})") from None
            if code in _REJECTED:
                raise RequestRejected(text, code, details) from None
            raise ServerFailure(text, code, details) from None

    # -- API ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """ModelService.GetModelStatus, as the same dict the REST API returns."""
        from google.protobuf import json_format

        request = self._pb["status"].GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)

    def metadata(self) -> dict[str, Any]:
        """PredictionService.GetModelMetadata, as the same dict the REST API returns."""
        from google.protobuf import json_format

        meta = self._pb["meta"]
        request = meta.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        response = self._call(self._predict.GetModelMetadata, request, "GetModelMetadata")
        signature_map = meta.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signature_map):
            raise ServerFailure("GetModelMetadata: metadata['signature_def'] is not a SignatureDefMap")
        opts = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        return {"model_spec": json_format.MessageToDict(response.model_spec, **opts),
                "metadata": {"signature_def": json_format.MessageToDict(signature_map, **opts)}}

    def signatures(self) -> dict[str, Any]:
        if self._signatures is None:
            self._signatures = signatures_from_metadata(self.metadata())
        return self._signatures

    def input_spec(self, signature: str, name: str) -> TensorSpec:
        sigs = self.signatures()
        if signature not in sigs or name not in sigs[signature]["inputs"]:
            raise InputError(f"the model has no input {name!r} in signature {signature!r}")
        return sigs[signature]["inputs"][name]

    def predict_tensors(self, signature: str, inputs: dict[str, np.ndarray],
                        output_filter: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], int]:
        """PredictionService.Predict with numpy inputs; ({output: array}, version that answered)."""
        request = self._pb["predict"].PredictRequest(output_filter=list(output_filter))
        self._spec(request.model_spec, signature)
        for name, array in inputs.items():
            request.inputs[name].CopyFrom(tensor_proto.from_ndarray(array, self._pb["tensor"]))
        response = self._call(self._predict.Predict, request, "Predict")
        outputs = {k: tensor_proto.to_ndarray(v) for k, v in response.outputs.items()}
        return outputs, int(response.model_spec.version.value)

    def _predict_pixels(self, images: np.ndarray) -> Prediction:
        return prediction_from_outputs(*self.predict_tensors(contract.SIGNATURE_PIXELS, {contract.INPUT_PIXELS: images}))

    def predict_encoded(self, pictures: Sequence[bytes], validate: bool = True) -> Prediction:
        """Digits for encoded pictures (PNG/JPEG bytes) through serving_bytes, in requests of
        at most max_batch_size pictures."""
        if not pictures:
            raise InputError("no pictures to send")
        spec = (self.input_spec(contract.SIGNATURE_BYTES, contract.INPUT_BYTES) if validate
                else TensorSpec(contract.INPUT_BYTES, "DT_STRING", (-1,)))
        array = check_tensor(list(pictures), spec, "pictures")
        return join_predictions([
            prediction_from_outputs(*self.predict_tensors(contract.SIGNATURE_BYTES, {contract.INPUT_BYTES: array[piece]}))
            for piece in request_slices(len(array), self.max_batch_size)])
