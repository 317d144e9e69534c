"""The serving graph: the Keras model wrapped in TF Serving's signatures (no I/O).

Signatures (names from common/contract.py):

    serving_default  image        uint8  [-1, 28, 28]  raw pixels, /255 is inside the graph
                     -> probabilities float32 [-1, 10], digit int64 [-1]
    serving_bytes    image_bytes  string [-1]          PNG/JPEG/BMP/WebP of any size
                     -> probabilities, digit, and mnist_image uint8 [-1, 28, 28]: the picture
                        in MNIST form, made inside the graph by export/picture_graph.py (the
                        specification in mobile/preprocess.py, the same the Pi runs)
"""

from __future__ import annotations

from common import contract


def pixels_archive(model, serve_pixels):
    """A keras.export.ExportArchive tracking `model` with the pixels signature: `serve_pixels`
    called on uint8 [batch, 28, 28] under the name contract.INPUT_PIXELS.

    The SavedModel for TF Serving and the TFLite converter's SavedModel both start here, so
    their pixels signature is one definition.
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=contract.SIGNATURE_PIXELS,
        fn=serve_pixels,
        input_signature=[tf.TensorSpec([None, *contract.IMAGE_SHAPE], tf.uint8, name=contract.INPUT_PIXELS)],
    )
    return archive


def build_archive(model):
    """A keras.export.ExportArchive with both signatures around `model` (no I/O)."""
    import tensorflow as tf

    def outputs(probabilities):
        return {
            contract.OUTPUT_PROBABILITIES: probabilities,
            contract.OUTPUT_DIGIT: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    def serve_pixels(image):  # the argument's name becomes the signature's input key
        return outputs(model(image, training=False))

    def serve_bytes(image_bytes):
        from export.picture_graph import picture_to_mnist

        images = tf.map_fn(
            picture_to_mnist, image_bytes,
            fn_output_signature=tf.TensorSpec(contract.IMAGE_SHAPE, tf.uint8),
        )
        return {**outputs(model(images, training=False)), contract.OUTPUT_MNIST_IMAGE: images}

    assert serve_pixels.__code__.co_varnames[0] == contract.INPUT_PIXELS
    assert serve_bytes.__code__.co_varnames[0] == contract.INPUT_BYTES

    archive = pixels_archive(model, serve_pixels)
    archive.add_endpoint(
        name=contract.SIGNATURE_BYTES,
        fn=serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=contract.INPUT_BYTES)],
    )
    return archive
