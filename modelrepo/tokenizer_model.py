"""Triton python model: text -> token ids, for the encoder and ranker ensembles.

One file, two uses, chosen by the model's config.pbtxt:
- input TEXT            -> input_ids, attention_mask                   (text_tokenizer, encoder)
- inputs QUERY and ITEM -> input_ids, attention_mask, token_type_ids   (pair_tokenizer, ranker)

When the config lists an output VERSION, every row also carries this model's version number. The
ensembles pin tokenizer and weights to the same version, so the `encoder` ensemble's
ENCODER_VERSION output tells the caller exactly which encoder embedded its texts (the gateway
checks it against the version its item index was built with).

Copied into each exported version together with that version's tokenizer.json, so a tokenizer
always travels with its model. Uses the `tokenizers` library only (fast, no torch). Pads each
request to a multiple of 8 tokens (at most `max_length`) so requests of similar length can share
a dynamic batch downstream.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

PAD_MULTIPLE = 8


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.pairs = any(i["name"] == "ITEM" for i in config["input"])
        self.with_version = any(o["name"] == "VERSION" for o in config["output"])
        self.version = int(args["model_version"])
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        # The version's own truncation (written by the export from the model's training config)
        # wins over the model-level default: a tokenizer must truncate as its model was trained.
        trained = self.tokenizer.truncation
        self.max_length = int(trained["max_length"]) if trained else int(params.get("max_length", "64"))
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.tokenizer.no_padding()

    def _texts(self, request, name):
        return [t.decode("utf-8", "replace") for t in pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)]

    def execute(self, requests):
        responses = []
        for request in requests:
            if self.pairs:
                encs = self.tokenizer.encode_batch(list(zip(self._texts(request, "QUERY"), self._texts(request, "ITEM"))))
            else:
                encs = self.tokenizer.encode_batch(self._texts(request, "TEXT"))
            longest = max((len(e.ids) for e in encs), default=1)
            width = min(self.max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
            ids = np.zeros((len(encs), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for k, e in enumerate(encs):
                n = min(len(e.ids), width)
                ids[k, :n], mask[k, :n], types[k, :n] = e.ids[:n], 1, e.type_ids[:n]
            outputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
            if self.pairs:
                outputs.append(pb_utils.Tensor("token_type_ids", types))
            if self.with_version:
                outputs.append(pb_utils.Tensor("VERSION", np.full((len(encs), 1), self.version, dtype=np.int64)))
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
