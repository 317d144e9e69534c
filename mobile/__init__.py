"""What runs on the Raspberry Pi: a TFLite MNIST classifier for photos of handwritten digits.

Shipped to the Pi (artifacts/mnist-pi.tar.gz, `make pi-bundle`); these import only the
standard library, numpy, Pillow and the TFLite interpreter they find:

- `runtime`    picks ai-edge-litert / tflite-runtime / tensorflow.lite and wraps the model
               (quantization read from the model, batches, threads).
- `preprocess` turns a real picture into MNIST form (numpy + Pillow).
- `classify`   the command line: `python3 -m mobile.classify --model mnist.tflite a.jpg`.
- `camera`     one frame from the Pi camera through picamera2, when installed.

Development-machine tools, kept out of the bundle (they import `model/` only inside the
functions that read MNIST or parse flags, so importing them needs nothing more):

- `synth`      realistic photos of digits on paper made from MNIST digits (tests, benchmark,
               the bundle's samples); numpy + Pillow only.
- `bundle`     `python -m mobile.bundle`: builds the Pi archive.
- `bench`      `python -m mobile.bench`: accuracy and latency through the mobile runtime.

Importing this package imports nothing.
"""

# The modules that go into the Pi bundle; tests check they import nothing else.
SHIPPED_MODULES = ("__init__", "__main__", "camera", "classify", "preprocess", "runtime")
