"""Project scripts: set-up, locking, proto generation, a throwaway local redis-server.
Run by the Makefile; not imported by the services."""
