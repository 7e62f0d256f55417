"""A local Triton for development and tests: tritonserver from the nvidia-pytriton wheel, an onnxruntime
shim backend, and a supervisor that restarts it. Production runs the official Triton image (triton_models/Dockerfile)."""
