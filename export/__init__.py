"""fastmlr.export — ONNX and TensorRT export with validation against the PyTorch reference."""
