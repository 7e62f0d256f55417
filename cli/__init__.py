"""The `recsys` command, the demo and the shop simulator: the one place that may import every other room.
Nothing imports it (services and training run without it)."""
