"""`python -m gateway.feedback`: run the feedback service (see server.py for settings)."""

from gateway.feedback.server import main

main()
