"""ONNX export of the trained models as new versions in the Triton model repository (int8 by default on CPU).
Tensor names come from contract/tensors.py."""
