"""`python -m feedback`: run the feedback service (see server.py for settings)."""

from feedback.server import main

main()
