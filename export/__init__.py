"""Export a training run: a versioned SavedModel for TF Serving and TFLite files for devices."""
