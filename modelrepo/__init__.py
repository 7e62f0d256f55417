"""The Triton model repository as code: its layout and version numbers, the tokenizer model it serves,
and publishing new versions without downtime. Used by training (export, publish) and by localtriton."""
