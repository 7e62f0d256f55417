"""The durable event log: written by the feedback service, read by training (labels) and at start-up (session replay).
Standard library only, so recovery runs without the project's venv (`python3 eventlog/event_log.py recover DIR`)."""
