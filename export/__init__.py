"""Export of a checkpoint to ONNX (and TensorRT plans) into ``model_repository/``."""
