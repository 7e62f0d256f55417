"""Fine-tuning loops and their data: encoder (in-batch negatives), ranker (listwise), interest model.
Each reads its examples through Feast point-in-time joins."""
