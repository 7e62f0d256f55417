"""Triton python model: text (BYTES) -> input_ids, attention_mask (INT64), for the encoder ensemble.

Copied into each exported version of `text_tokenizer/` together with that version's tokenizer.json,
so the tokenizer is always the one the encoder version was trained with. Uses the `tokenizers`
library only (fast, no torch). Pads each request to a multiple of 16 tokens (max from the config
parameter `max_length`) so requests of similar length can share a dynamic batch downstream.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

PAD_MULTIPLE = 16


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_length = int(params.get("max_length", "64"))
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            encs = self.tokenizer.encode_batch([t.decode("utf-8", "replace") for t in texts])
            longest = max((len(e.ids) for e in encs), default=1)
            width = min(self.max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
            ids = np.zeros((len(encs), width), dtype=np.int64)
            mask = np.zeros((len(encs), width), dtype=np.int64)
            for k, e in enumerate(encs):
                n = min(len(e.ids), width)
                ids[k, :n] = e.ids[:n]
                mask[k, :n] = 1
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask),
            ]))
        return responses
