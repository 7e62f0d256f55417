"""Training data: the synthetic shop, the importer and its schema, feature tables, labels, Feast operations.
What these write is what the feature repo reads (feature_repo/)."""
