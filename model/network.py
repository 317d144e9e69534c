"""The MLP: raw uint8 pixels in, class probabilities out, normalisation inside the graph.

No I/O here. `build_mlp` takes plain arguments (the training config passes its fields) and
returns an uncompiled `keras.Model`:

    image  uint8   [B, 28, 28]   raw pixels 0-255, named contract.INPUT_PIXELS
      -> Rescaling(1/255)  float [B, 28, 28]     (the only place pixels are normalised)
      -> Flatten           float [B, 784]
      -> (Dense -> BatchNorm -> ReLU -> Dropout) x len(hidden_units)
      -> Dense(10)             logits [B, 10]
      -> Rescaling(1/T)        "temperature": logits / T (T = 1 until calibrated)
      -> Softmax (float32 even under mixed precision)
    probabilities float32 [B, 10], named contract.OUTPUT_PROBABILITIES

Every later form of the model (SavedModel, TFLite, TF Serving, the Pi) therefore takes raw
pixels, and nobody re-implements `/255`; and they all carry the calibration temperature
(model/calibration.py fits T on the validation split), since it is a layer of the model.

`dropout_rng="philox"` builds the training form: its Dropout draws masks with TF's Philox
generator named explicitly (see `philox_dropout_class`). It computes the same function and
has the same weights as the default form, which is the one saved and exported (built-in
layers only, so `keras.models.load_model` needs nothing of this repository).
"""

from __future__ import annotations

from typing import Literal, Sequence

from common import contract

TEMPERATURE_LAYER = "temperature"


def philox_dropout_class():
    """keras.layers.Dropout whose masks come from TF's Philox generator, named explicitly.

    Keras' Dropout leaves the algorithm to TF ("auto_select"). Inside an XLA-compiled step on
    the CPU that selects ThreeFry, whose expansion is slow scalar code: a [128, 800] mask
    costs tens of times what Philox's does, enough to make the XLA-compiled training step
    slower than the uncompiled one. With Philox, XLA's step is the faster.
    Masks still come from the layer's own SeedGenerator, so the run stays reproducible.
    """
    import keras
    import tensorflow as tf

    global _PHILOX_DROPOUT
    if _PHILOX_DROPOUT is None:

        class PhiloxDropout(keras.layers.Dropout):
            def call(self, inputs, training=False):
                if not training or self.rate == 0:
                    return inputs
                # SeedGenerator state is int64; stateless ops under XLA want int32 seeds.
                seed = tf.cast(tf.math.floormod(self.seed_generator.next(), 2**31 - 1), tf.int32)
                return tf.nn.experimental.stateless_dropout(
                    inputs, rate=self.rate, seed=seed, rng_alg="philox", noise_shape=self.noise_shape
                )

        _PHILOX_DROPOUT = PhiloxDropout
    return _PHILOX_DROPOUT


_PHILOX_DROPOUT = None


def build_mlp(
    hidden_units: Sequence[int] = (1024, 512),
    dropout: float = 0.2,
    input_dropout: float = 0.0,
    batch_norm: bool = True,
    seed: int = 0,
    temperature: float = 1.0,
    dropout_rng: Literal["keras", "philox"] = "keras",
    synchronized_batch_norm: bool = False,
):
    """A Keras functional MLP for 28x28 digits.

    Args:
      hidden_units: width of each hidden Dense layer, input side first.
      dropout: dropout rate after each hidden layer.
      input_dropout: dropout rate on the 784 normalised pixels (0 disables it).
      batch_norm: BatchNormalization between each Dense and its ReLU (folded into the Dense
        weights by the TFLite converter, so it costs nothing at inference).
      seed: seeds the initialisers and dropout layers.
      temperature: T > 0 of temperature scaling (Guo et al., "On Calibration of Modern Neural
        Networks", ICML 2017): probabilities = softmax(logits / T). 1 changes nothing.
      dropout_rng: "keras" (keras.layers.Dropout) or "philox" (philox_dropout_class(), the
        fast form under XLA on the CPU). Both have the same weights and inference function.
      synchronized_batch_norm: BatchNormalization(synchronized=True): under a tf.distribute
        strategy with several replicas, each step's batch statistics are all-reduced over the
        global batch instead of taken per replica, so N replicas train as one device with the
        same global batch would. Same weights and inference function either way.

    Returns an uncompiled keras.Model whose input is uint8 [None, 28, 28] named "image" and
    whose output is float32 [None, 10] named "probabilities". Raises ValueError for bad widths,
    rates or temperature.
    """
    import keras

    if not hidden_units or any(int(u) <= 0 for u in hidden_units):
        raise ValueError(f"hidden_units must be positive widths, got {tuple(hidden_units)}")
    if not 0.0 <= dropout < 1.0 or not 0.0 <= input_dropout < 1.0:
        raise ValueError("dropout rates must be in [0, 1)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    Dropout = philox_dropout_class() if dropout_rng == "philox" else keras.layers.Dropout

    inputs = keras.Input(
        shape=contract.IMAGE_SHAPE, dtype="uint8", name=contract.KERAS_INPUT_NAME
    )
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)  # [B, 28, 28] in [0, 1]
    x = keras.layers.Flatten(name="flatten")(x)  # [B, 784]
    if input_dropout > 0:
        x = Dropout(input_dropout, seed=seed, name="input_dropout")(x)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(
            int(units),
            use_bias=not batch_norm,  # BatchNorm's beta is the bias
            kernel_initializer=keras.initializers.HeNormal(seed=seed + i),
            name=f"dense_{i}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(synchronized=synchronized_batch_norm, name=f"batch_norm_{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
        if dropout > 0:
            x = Dropout(dropout, seed=seed + 100 + i, name=f"dropout_{i}")(x)
    logits = keras.layers.Dense(
        contract.NUM_CLASSES,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1000),
        name="logits",
    )(x)
    # Temperature and softmax in float32 even under a mixed_float16 policy: fp16 softmax loses
    # small probabilities and makes the loss noisy.
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name=TEMPERATURE_LAYER)(logits)
    probabilities = keras.layers.Activation(
        "softmax", dtype="float32", name=contract.KERAS_OUTPUT_NAME
    )(scaled)
    return keras.Model(inputs, probabilities, name="mnist_mlp")
