"""`feast`'s own CLI, without the DeprecationWarnings ibis prints on every offline read.

    python -m scorer.data.feast_quiet -c feature_repo materialize START END

Why not PYTHONWARNINGS: importing `feast.feature_store` runs `warnings.simplefilter("once",
DeprecationWarning)`, which goes in front of the environment's filters, so ibis's
`fetch_arrow_table() is deprecated` (duckdb) reaches the user's terminal during `feast materialize`.
A filter added after that import wins; everything else of the CLI is Feast's, unchanged.
"""

from __future__ import annotations

import os
import sys
import warnings


def main() -> int:
    import feast.feature_store  # noqa: F401  (installs Feast's filter first, so ours goes in front of it)
    from feast.cli.cli import cli

    warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)
    try:
        cli(prog_name="feast", standalone_mode=False)  # raises on failure, returns when done
        code = 0
    except SystemExit as e:  # --help, click's usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001  (Feast's own error, as its CLI prints it)
        print(f"Error: {e}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    from rpc.process_exit import exit_without_teardown

    # The command's work is done and committed (registry, online store): skip duckdb's teardown report.
    exit_without_teardown(main())
