"""The shared contract: facts that serving (gateway/, feedback/) and training (scorer/) must agree on.
It imports neither side: item text, ranker inputs, session features, score parts, model constants, Triton tensors."""
