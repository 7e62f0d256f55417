"""A python-based Triton backend named `onnxruntime`, for the local CPU server only.

The Triton server shipped in `nvidia-pytriton` has the python backend but no onnxruntime backend.
Installed by the launcher as `<backends>/onnxruntime/model.py`, this file lets an unmodified
NGC-style model (`backend: "onnxruntime"`, `<version>/model.onnx`) load locally; in production the
NGC container's real ONNX Runtime backend serves the very same model directory.

Inputs and outputs are taken from config.pbtxt (this shim does not auto-complete configs). ORT
threads are pinned (parameter `intra_op_thread_count`, default 1; the committed configs use 2): on
2 cores unpinned threads of several model instances fight and latency explodes.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        opts.inter_op_num_threads = 1
        # Spinning threads keep a core busy for a while after each run; on 2 cores that steals the
        # CPU from the next model of the same request (encoder -> ranker). Configurable per model.
        opts.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        # Triton hands TYPE_STRING inputs over as bytes objects; ONNX Runtime's string tensors want str
        # (it would read a bytes object as its repr, "b'...'", silently). The real backend converts too.
        self.string_inputs = {i["name"] for i in config["input"] if i["data_type"] == "TYPE_STRING"}
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def _input(self, request, name):
        arr = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
        if name in self.string_inputs:
            arr = np.vectorize(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v),
                               otypes=[object])(arr)
        return arr

    def execute(self, requests):
        # Requests batched by Triton's dynamic batcher arrive together: run them as one ORT call
        # when their shapes allow (same sequence length), else one by one.
        feeds = [{n: self._input(r, n) for n in self.inputs} for r in requests]
        shapes = {tuple(f[self.inputs[0]].shape[1:]) for f in feeds}
        if len(feeds) > 1 and len(shapes) == 1:
            sizes = [f[self.inputs[0]].shape[0] for f in feeds]
            merged = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
            outs = self.session.run([o for o, _ in self.outputs], merged)
            splits = np.cumsum(sizes)[:-1]
            per_request = list(zip(*[np.split(o, splits) for o in outs]))
        else:
            per_request = [self.session.run([o for o, _ in self.outputs], f) for f in feeds]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(arr, dtype=dt))
                                        for (name, dt), arr in zip(self.outputs, outs)])
            for outs in per_request
        ]
