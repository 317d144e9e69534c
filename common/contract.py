"""Names that cross a process boundary, defined once.

Training, export, the serving clients, the local server and the tests all import these
constants instead of typing the strings again. This module is pure Python (no TensorFlow,
no numpy), so the REST client can import it on a machine that has neither.

`mobile/` deliberately does not import it: the Pi reads the same facts from the files it is
given (the TFLite model's own input/output details and `labels.txt`), and a test checks that
those files agree with this module.
"""

from __future__ import annotations

# --- The model as TF Serving knows it ------------------------------------------------------
MODEL_NAME = "mnist"

# Signature that takes raw pixels. TF Serving uses it when a request names no signature.
SIGNATURE_PIXELS = "serving_default"
# Signature that takes encoded pictures (PNG/JPEG, any size, grey or colour).
SIGNATURE_BYTES = "serving_bytes"

# Input keys. The `_bytes` suffix is what makes TF Serving's REST API accept {"b64": ...}.
INPUT_PIXELS = "image"
INPUT_BYTES = "image_bytes"

# Output keys of both signatures.
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_DIGIT = "digit"
# serving_bytes only: the picture the model saw, uint8 [N, 28, 28] (MNIST form, white on
# black), as the preprocessing made it from the encoded picture.
OUTPUT_MNIST_IMAGE = "mnist_image"

# --- The data ------------------------------------------------------------------------------
IMAGE_HEIGHT = 28
IMAGE_WIDTH = 28
IMAGE_SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH)
NUM_CLASSES = 10
# Class index i is the digit str(i); labels.txt holds these, one per line.
LABELS = tuple(str(i) for i in range(NUM_CLASSES))

# Keras layer names of the model's input and output (the functional model's own names).
KERAS_INPUT_NAME = INPUT_PIXELS
KERAS_OUTPUT_NAME = OUTPUT_PROBABILITIES

# --- Files ---------------------------------------------------------------------------------
# Inside a run folder (artifacts/runs/<run-id>/).
RUN_MODEL_FILE = "model.keras"
RUN_CONFIG_FILE = "config.json"
RUN_METRICS_FILE = "metrics.json"
RUN_GPU_REPORT_FILE = "gpu_report.json"
# Inside a SavedModel version folder, TF Serving's own conventions.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
VERSION_METRICS_FILE = "assets.extra/metrics.json"
# The TFLite export's folder (artifacts/mobile/): the recommended model, with its labels and
# the report beside it (mobile/ reads labels.txt by this name too; it cannot import this).
MOBILE_MODEL_FILE = "mnist.tflite"
MOBILE_REPORT_FILE = "report.json"
LABELS_FILE = "labels.txt"
