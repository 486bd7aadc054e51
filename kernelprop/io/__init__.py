"""Reading and writing results: ``.json`` (metadata + measures), ``.csv`` (tidy long table),
``.npz`` (full kernels), ``.nc``/``.zarr`` (an xarray Dataset, :func:`write_dataset`; optional extra);
small per-record ``.csv`` tables (:mod:`.tables`). See docs/formats.md."""

from .results import FORMATS, check_format, versions, write, write_dataset
from .tables import comparison_rows, gradient_rows, moment_rows, write_csv

__all__ = ["FORMATS", "check_format", "comparison_rows", "gradient_rows", "moment_rows", "versions", "write",
           "write_csv", "write_dataset"]
