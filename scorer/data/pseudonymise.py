"""Pseudonymised offline data: `recsys data import` with a pseudonym key (rpc/pseudonyms.py).

The shop's export holds raw ids; the feature repo must hold the same pseudonyms the gateway and the
feedback service compute, or no request would find its user's profile. So, when a key is
configured, the import reads a pseudonymised copy of the data set: every table file of the folder
(.parquet / .csv) with a `user_id` or `session_id` column gets those values replaced by their
pseudonyms, in a private temporary folder, and the importer (scorer/data/importer.py) reads that.
Nothing derived from the raw ids is written to the feature repo. Values that are not valid ids
stay as they are, so the importer still reports them (a pseudonym would hide the error).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.rules import ID_PATTERN
from rpc.pseudonyms import SESSION, USER, Pseudonyms

COLUMNS = {"user_id": USER, "session_id": SESSION}


def _mapped(values: list, pseudonyms: Pseudonyms, kind: str) -> list:
    cache: dict[str, str] = {}
    out = []
    for v in values:
        if isinstance(v, str) and v and ID_PATTERN.fullmatch(v):
            p = cache.get(v)
            if p is None:
                p = cache[v] = pseudonyms.of(v, kind)
            out.append(p)
        else:
            out.append(v)
    return out


def pseudonymise_file(src: Path, dest: Path, pseudonyms: Pseudonyms) -> int:
    """Copy one table file with its id columns pseudonymised; return how many columns were."""
    if src.suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(src, dtype=str, keep_default_na=False)  # text in, the same text out
        cols = [c for c in COLUMNS if c in df.columns]
        for c in cols:
            df[c] = _mapped(df[c].tolist(), pseudonyms, COLUMNS[c])
        df.to_csv(dest, index=False)
        return len(cols)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    cols = [c for c in COLUMNS if c in table.column_names]
    for c in cols:
        i = table.column_names.index(c)
        field = table.schema.field(i)
        column = pa.array(_mapped(table.column(c).to_pylist(), pseudonyms, COLUMNS[c]), field.type)
        table = table.set_column(i, field, column)
    pq.write_table(table, dest)
    return len(cols)


@contextmanager
def pseudonymised_copy(data_dir: Path, pseudonyms: Pseudonyms) -> Iterator[Path]:
    """A temporary folder with data_dir's table files, ids pseudonymised (other files copied);
    removed on exit."""
    with tempfile.TemporaryDirectory(prefix="recsys-pseudonymised-") as tmp:
        out = Path(tmp)
        for src in sorted(Path(data_dir).iterdir()):
            if src.is_file() and src.suffix in (".parquet", ".csv"):
                pseudonymise_file(src, out / src.name, pseudonyms)
            elif src.is_file():
                shutil.copy2(src, out / src.name)
        yield out
