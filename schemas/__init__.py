"""The single source of truth for rows, statuses, and run-level files.

Everything that names a column, a status or a manifest field imports it from here:
the planner (required/produced columns), the stages (types of what they add),
the writer (what goes to Parquet, to the tar's ``.json``) and the tests.
"""

from schemas.row import (
    BASE_FIELDS,
    BASE_SCHEMA,
    HEAVY_COLUMNS,
    STAGE_FIELDS,
    TAR_EXCLUDED_COLUMNS,
    conform,
    empty_table,
    field_type,
    null_heavy,
)
from schemas.status import OK, STATUSES, Status, is_ok

__all__ = [
    "BASE_FIELDS",
    "BASE_SCHEMA",
    "HEAVY_COLUMNS",
    "OK",
    "STAGE_FIELDS",
    "STATUSES",
    "Status",
    "TAR_EXCLUDED_COLUMNS",
    "conform",
    "empty_table",
    "field_type",
    "is_ok",
    "null_heavy",
]
