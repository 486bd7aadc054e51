"""Labelled results: sweeps (and runs, :func:`kernelprop.io.results.write_dataset`) as xarray
Datasets written as netCDF (``.nc``, through h5netcdf) or Zarr (``.zarr``, when zarr is installed);
extra ``kernelprop[xarray]``. xarray is imported only here, and only when asked for.

A sweep's Dataset has one dimension per swept parameter (its coordinate holds the values, with
``spacing`` and ``long_name`` attributes), one float64 data variable per measure over those
dimensions, and the sweep's metadata as JSON in the attribute ``kernelprop``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import SpecError
from .extras import MissingExtraError, require

DATASET_FORMATS = (".nc", ".zarr")
__all__ = ["DATASET_FORMATS", "MissingExtraError", "load_dataset", "save_dataset", "sweep_dataset"]


def xarray():
    require("h5netcdf", "xarray", "a labelled (.nc) result")
    require("h5py", "xarray", "a labelled (.nc) result")
    return require("xarray", "xarray", "a labelled (.nc, .zarr) result")


def sweep_dataset(result):
    """The :class:`~kernelprop.sweep.SweepResult` ``result`` as an ``xarray.Dataset``."""
    from ..io.results import _default
    xr = xarray()
    coords = {a.name: (a.name, np.asarray(a.values), {"spacing": a.spacing, "long_name": a.label or a.name})
              for a in result.axes}
    data = {m: (tuple(result.names), np.asarray(g, dtype=np.float64), {"long_name": m})
            for m, g in result.values.items()}
    return xr.Dataset(data, coords=coords, attrs={"kind": "kernelprop sweep", "at": result.at,
                                                  "kernelprop": json.dumps(result._meta(), default=_default)})


def save_dataset(ds, path) -> Path:
    """Write ``ds`` to ``path`` (``.nc`` or ``.zarr``) atomically: into a temporary file or folder
    beside it, then renamed, so a failure leaves no partial result."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATASET_FORMATS:
        raise SpecError("output", str(path), f"a labelled result is {' or '.join(DATASET_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".nc":
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            ds.to_netcdf(name, engine="h5netcdf")
            os.chmod(name, 0o666 & ~_umask())
            os.replace(name, path)
        except BaseException:
            if os.path.exists(name):
                os.unlink(name)
            raise
        return path
    require("zarr", "xarray", "a .zarr result")
    if path.exists() and not _is_zarr(path):
        raise SpecError("output", str(path), "exists and is not a Zarr store; it is not overwritten")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        ds.to_zarr(str(tmp), mode="w", consolidated=False)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "store")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / "store", path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (".zgroup", "zarr.json", ".zattrs"))


def open_dataset(path):
    """Open a ``.nc`` or ``.zarr`` result as an ``xarray.Dataset`` (values loaded into memory)."""
    xr = xarray()
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        require("zarr", "xarray", "a .zarr result")
        with xr.open_zarr(str(path), consolidated=False) as ds:
            return ds.load()
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()


def load_dataset(path):
    """A :class:`~kernelprop.sweep.SweepResult` from a ``.nc``/``.zarr`` sweep written by
    :meth:`~kernelprop.sweep.SweepResult.write`."""
    from .files import DEPTH_NAMES, Axis, _result
    ds = open_dataset(path)
    if ds.attrs.get("kind") != "kernelprop sweep":
        raise SpecError("result", str(path), "is not a sweep (no attribute kind = \"kernelprop sweep\")")
    meta = json.loads(ds.attrs["kernelprop"])
    axes = tuple(Axis(a["name"], np.asarray(ds[a["name"]].values, dtype=int if a["name"] in DEPTH_NAMES else float),
                      a.get("spacing", "linear"), a.get("label", "")) for a in meta["axes"])
    names = [a.name for a in axes]
    values = {m: np.asarray(ds[m].transpose(*names).values, dtype=np.float64) for m in meta["measures"]}
    return _result(axes, values, meta)
