"""The CSV of every benchmark script: its columns, a writer and a reader. Plain Python (no
torch), so that plot.py, which only reads CSVs, starts in a fraction of a second: importing a
CUDA build of torch took seconds of the GPU check's plot step.
"""

from __future__ import annotations

import csv
import os

# One row per (case, provider, mode), in this order. `D` is the hidden size of ops that take
# one (linear_cross_entropy); 0 for plain cross_entropy on logits.
COLUMNS = ("device", "torch", "triton", "date", "op", "provider", "mode", "dtype",
           "N", "V", "D", "ms", "gbps", "copy_gbps", "peak_mem_mb")
INT_COLUMNS = ("N", "V", "D")
FLOAT_COLUMNS = ("ms", "gbps", "copy_gbps", "peak_mem_mb")  # peak_mem_mb may be empty


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class CsvWriter:
    """Writes rows with exactly COLUMNS, flushing each row so an interrupted run keeps what it
    measured. append=True adds to an existing file (whose header must be COLUMNS).

        with CsvWriter("bench/results/x.csv") as out:
            out.write(device=..., ..., peak_mem_mb=None)   # None -> empty field
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        exists = append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, newline="") as f:
                header = tuple(next(csv.reader(f), ()))
            if header != COLUMNS:
                raise ValueError(f"{self.path} has columns {header}, expected {COLUMNS}")
        self._file = open(self.path, "a" if exists else "w", newline="")
        self._csv = csv.writer(self._file)
        if not exists:
            self._csv.writerow(COLUMNS)
            self._file.flush()

    def write(self, **row) -> None:
        if set(row) != set(COLUMNS):
            missing = set(COLUMNS) - set(row)
            extra = set(row) - set(COLUMNS)
            raise ValueError(f"row must have exactly COLUMNS; missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        self._csv.writerow([_format(row[c]) for c in COLUMNS])
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV written by CsvWriter, with N/V/D as int and ms/gbps/copy_gbps/
    peak_mem_mb as float (None where empty). Raises ValueError on another header."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {COLUMNS}")
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) != len(COLUMNS):
                raise ValueError(f"{path}: row {values} has {len(values)} fields, "
                                 f"expected {len(COLUMNS)}")
            row = dict(zip(COLUMNS, values))
            for c in INT_COLUMNS:
                row[c] = int(row[c])
            for c in FLOAT_COLUMNS:
                row[c] = float(row[c]) if row[c] != "" else None
            rows.append(row)
    return rows
