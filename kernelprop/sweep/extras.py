"""Optional dependencies (``pip install 'kernelprop[dask]'``, ``'kernelprop[xarray]'``), imported
only when a feature asks for them."""

from __future__ import annotations

import importlib

from ..errors import NotSupportedError


class MissingExtraError(NotSupportedError, ImportError):
    """An optional dependency (a ``kernelprop[...]`` extra) is not installed."""


def require(module: str, extra: str, what: str):
    """Import ``module``, or raise :class:`MissingExtraError` naming ``pip install 'kernelprop[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the package {module.split('.')[0]}: "
                                f"pip install 'kernelprop[{extra}]'") from None
