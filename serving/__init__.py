"""Serving the MNIST model with TensorFlow Serving's REST and gRPC APIs.

- compose.yaml, models.config, batching_parameters.txt, monitoring.config: the TF Serving
  deployment (make serve-docker); docker_check.py checks the image's TensorFlow first.
- server.py: a local stand-in speaking the same APIs over the same SavedModels
  (make serve-local): start-up and shutdown, over settings.py (its config and flags),
  core.py (the request path both APIs share), rest.py and grpc_api.py (the two APIs),
  model_manager.py (versions, labels, warm-up, swaps), batching.py (server-side batching),
  json_tensor.py (TF Serving's REST JSON rules), rapidjson_compat.py (rapidjson's reader
  and error-quote writer, as TF Serving uses them), tensor_proto.py, config_files.py and
  metrics.py. COMPATIBILITY.md lists what it mirrors.
- protocol.py: what server and clients share (status codes, ApiError, DataType).
- client.py (REST: requests + numpy, no TensorFlow), grpc_client.py, query.py (the CLI,
  make query), bench.py (make bench-serve), process.py (run the server as a subprocess).

Importing any of these modules has no side effects; TensorFlow is imported only by the
functions that load models or build gRPC messages.
"""
