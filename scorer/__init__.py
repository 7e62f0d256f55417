"""Training and evaluation: data import, feature tables, models, fine-tuning, offline metrics, ONNX export, publishing.
It imports the shared contract and the model repository code, never serving (gateway/, feedback/)."""
