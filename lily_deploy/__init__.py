"""lily-deploy: Lily adapters from fine-tuning to ONNX, TensorRT and proven parity."""
__version__ = "0.1.0"
