"""TF Serving's warm-up file (assets.extra/tf_serving_warmup_requests): written at export,
replayed by TF Serving, by the local server and by the export's own check when a version loads.

Small on purpose: the local server imports it to read the file, and nothing of the exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import configlib, contract

WARMUP_BATCH_SIZES = (1, 8)


def warmup_images(batch: int) -> np.ndarray:
    """uint8 [batch, 28, 28]: a synthetic stroke, enough to run every kernel once."""
    images = np.zeros((batch, *contract.IMAGE_SHAPE), dtype=np.uint8)
    images[:, 4:24, 13:15] = 255
    return images


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3|4] pixels as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def warmup_pictures() -> list[bytes]:
    """Encoded pictures for serving_bytes' warm-up, one per path through its preprocessing:
    a 28x28 MNIST-form PNG (passed through), and the synthetic stroke drawn dark on white
    paper as PNG and as JPEG (the whole pipeline, both decoders)."""
    import io

    from PIL import Image

    stroke = warmup_images(1)[0]
    paper = 255 - np.kron(stroke, np.ones((3, 3), np.uint8))  # 84 x 84, a dark bar on white
    buffer = io.BytesIO()
    Image.fromarray(paper).save(buffer, format="JPEG", quality=90)
    return [encode_png(stroke), encode_png(paper), buffer.getvalue()]


def write_warmup(path: Path, model_name: str = contract.MODEL_NAME) -> int:
    """TF Serving's warm-up file: a TFRecord of PredictionLog protos, one per request.

    TF Serving replays them when it loads the version, before serving it, so the first real
    request does not pay for graph initialisation. Returns the number of records.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    def request(signature: str, key: str, value) -> prediction_log_pb2.PredictionLog:
        req = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
        )
        req.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req)
        )

    records = []
    for batch in WARMUP_BATCH_SIZES:
        records.append(request(contract.SIGNATURE_PIXELS, contract.INPUT_PIXELS, warmup_images(batch)))
    records.append(request(contract.SIGNATURE_BYTES, contract.INPUT_BYTES, np.array(warmup_pictures(), dtype=object)))
    with configlib.naming_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in records:
                writer.write(record.SerializeToString())
    return len(records)


def read_warmup(path: Path) -> list:
    """The PredictionLog records of a warm-up file (for checks and for our local server)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw)
        logs.append(log)
    return logs
