"""Offline evaluation: Recall@k / NDCG@k of the encoder, ranker and interest model against baselines.
Each writes a report with a table and a plot (var/reports/)."""
