"""The models in torch: the bi-encoder, the cross-encoder ranker and the interest model.
Their starting constants come from the contract, so an untrained model equals the serving fallback."""
