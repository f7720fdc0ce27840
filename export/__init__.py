"""tillsight export: models to ONNX with tf2onnx (needs the `train` extra)."""
