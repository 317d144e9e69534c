"""The MLP: raw uint8 pixels in, class probabilities out, normalisation inside the graph.

No I/O here. `build_mlp` takes plain arguments (the training config passes its fields) and
returns an uncompiled `keras.Model`:

    image  uint8   [B, 28, 28]   raw pixels 0-255, named contract.INPUT_PIXELS
      -> Rescaling(1/255)  float [B, 28, 28]     (the only place pixels are normalised)
      -> Flatten           float [B, 784]
      -> (Dense -> BatchNorm -> ReLU -> Dropout) x len(hidden_units)
      -> Dense(10) -> Softmax (float32 even under mixed precision)
    probabilities float32 [B, 10], named contract.OUTPUT_PROBABILITIES

Every later form of the model (SavedModel, TFLite, TF Serving, the Pi) therefore takes raw
pixels, and nobody re-implements `/255`.
"""

from __future__ import annotations

from typing import Sequence

from model import contract


def build_mlp(
    hidden_units: Sequence[int] = (1024, 512),
    dropout: float = 0.2,
    input_dropout: float = 0.0,
    batch_norm: bool = True,
    seed: int = 0,
):
    """A Keras functional MLP for 28x28 digits.

    Args:
      hidden_units: width of each hidden Dense layer, input side first.
      dropout: dropout rate after each hidden layer.
      input_dropout: dropout rate on the 784 normalised pixels (0 disables it).
      batch_norm: BatchNormalization between each Dense and its ReLU (folded into the Dense
        weights by the TFLite converter, so it costs nothing at inference).
      seed: seeds the initialisers and dropout layers.

    Returns an uncompiled keras.Model whose input is uint8 [None, 28, 28] named "image" and
    whose output is float32 [None, 10] named "probabilities".
    """
    import keras

    if not hidden_units or any(int(u) <= 0 for u in hidden_units):
        raise ValueError(f"hidden_units must be positive widths, got {tuple(hidden_units)}")
    if not 0.0 <= dropout < 1.0 or not 0.0 <= input_dropout < 1.0:
        raise ValueError("dropout rates must be in [0, 1)")

    inputs = keras.Input(
        shape=contract.IMAGE_SHAPE, dtype="uint8", name=contract.KERAS_INPUT_NAME
    )
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)  # [B, 28, 28] in [0, 1]
    x = keras.layers.Flatten(name="flatten")(x)  # [B, 784]
    if input_dropout > 0:
        x = keras.layers.Dropout(input_dropout, seed=seed, name="input_dropout")(x)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(
            int(units),
            use_bias=not batch_norm,  # BatchNorm's beta is the bias
            kernel_initializer=keras.initializers.HeNormal(seed=seed + i),
            name=f"dense_{i}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"batch_norm_{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=seed + 100 + i, name=f"dropout_{i}")(x)
    logits = keras.layers.Dense(
        contract.NUM_CLASSES,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1000),
        name="logits",
    )(x)
    # Softmax in float32 even under a mixed_float16 policy: fp16 softmax loses small
    # probabilities and makes the loss noisy.
    probabilities = keras.layers.Activation(
        "softmax", dtype="float32", name=contract.KERAS_OUTPUT_NAME
    )(logits)
    return keras.Model(inputs, probabilities, name="mnist_mlp")
