"""`csv_column`: one column of CSV files, one document per non-empty cell."""

from __future__ import annotations

import csv
import glob
from collections.abc import Iterator
from pathlib import Path

from llmforge.plugin import Document, SourceContext

from llmforge_extras.options import CSVColumnOptions


def csv_column(options: CSVColumnOptions, *, context: SourceContext) -> Iterator[Document]:
    """Factory of the `csv_column` source (`llmforge.plugin.SourceFactory`)."""
    files = sorted({f for pattern in options.paths for f in glob.glob(str(Path(pattern).expanduser()), recursive=True)})
    for file in files:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=options.delimiter)
            if options.column not in (reader.fieldnames or []):
                # data.on_error decides: stop naming the file, or skip and count it.
                context.errors.bad(file, f"no column {options.column!r} (header: {', '.join(reader.fieldnames or [])})",
                                   f"fix {context.name}.column")
                continue
            for row in reader:
                text = row[options.column]
                if text:
                    yield Document(text, f"{file}:{reader.line_num}")
