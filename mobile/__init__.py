"""What runs on the Raspberry Pi: a TFLite MNIST classifier for photos of handwritten digits.

This package is exactly what the Pi bundle ships (artifacts/mnist-pi.tar.gz, `make pi-bundle`).
It imports only the standard library, numpy, Pillow and the TFLite interpreter it finds, never
TensorFlow and never the rest of the kit (tests/test_dependencies.py checks both):

- `runtime`    picks ai-edge-litert / tflite-runtime / tensorflow.lite and wraps the model
               (quantization read from the model, batches, threads).
- `preprocess` turns a real picture into MNIST form (numpy + Pillow).
- `classify`   the command line: `python3 -m mobile.classify --model mnist.tflite a.jpg`.
- `camera`     one frame from the Pi camera through picamera2, when installed.

The development-machine side of the Pi lives in pi/: `pi/bundle.py` builds the archive,
`pi/bench_mobile.py` measures this package (`make bench-mobile`), `pi/smoke.py` runs the
bundle on emulated arm64 Raspberry Pi OS (`make pi-smoke`); `model/pictures.py` makes the
synthetic pictures of digits they and the export's checks use.

Importing this package imports nothing.
"""

# The modules of this package, all shipped to the Pi; tests check they import nothing else.
SHIPPED_MODULES = ("__init__", "__main__", "camera", "classify", "preprocess", "runtime")
