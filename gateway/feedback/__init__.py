"""The feedback service: events in, durable labels and fresh session features out."""
