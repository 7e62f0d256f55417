"""`python -m gateway [config.toml]`: run the gateway (settings from RECSYS_* env over the file)."""

import sys
from pathlib import Path

from gateway.server import main

main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
