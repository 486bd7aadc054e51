"""Write a trajectory as .json, .csv or .npz, atomically (no partial file on failure)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from ..errors import SpecError

FORMATS = (".json", ".csv", ".npz")


def versions() -> dict:
    import scipy
    import sympy

    from .. import __version__
    return {"kernelprop": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "sympy": sympy.__version__}


def _records(traj):
    for r, label in enumerate(traj.labels):
        yield r, label, int(traj.blocks[r]), {k: v[r] for k, v in traj.measures.items()}


def to_dict(traj, spec_raw=None, extra=None) -> dict:
    """JSON-ready metadata and per-record measures (profiles as lists)."""
    rows = []
    for r, label, l, ms in _records(traj):
        row = {"record": r, "label": label, "block": l}
        row.update({k: (v.tolist() if np.ndim(v) else _num(v)) for k, v in ms.items()})
        rows.append(row)
    return {
        "versions": versions(),
        "spec": spec_raw if spec_raw is not None else {"network": repr(traj.network)},
        "input": {"description": traj.inputs.description, "segments": list(traj.segments)},
        "depth": traj.network.depth,
        "params": dict(traj.network.params),
        **(extra or {}),
        "records": rows,
    }


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None


def tidy_rows(traj):
    """Long table rows ``(record, label, block, measure, position, value)``; position is '' for scalars."""
    for r, label, l, ms in _records(traj):
        for name, v in ms.items():
            if np.ndim(v) == 0:
                yield r, label, l, name, "", repr(float(v))
            else:
                for pos, x in enumerate(v):
                    yield r, label, l, name, pos, repr(float(x))


def check_format(path, formats=FORMATS, writer: str | None = None) -> str:
    """The extension of ``path`` if it is one of ``formats``; :class:`SpecError` naming ``output``
    otherwise (saying what ``writer`` writes, if given)."""
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        raise SpecError("output", str(path), f"{writer} writes {' or '.join(formats)}" if writer else
                        f"extension must be one of {list(formats)}")
    check_writable(path)
    return suffix


def check_writable(path):
    """A :class:`SpecError` naming ``output`` unless a file can be written at ``path``: not a directory,
    its nearest existing ancestor a writable directory (checked before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise SpecError("output", str(path), "is a directory; give a file name inside it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpecError("output", str(path), f"{parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError("output", str(path), f"the directory {parent} is not writable")


def write(traj, path, spec_raw=None, extra=None) -> Path:
    """Write ``traj`` to ``path``; the format follows the extension (.json, .csv, .npz)."""
    path = Path(path)
    suffix = check_format(path)
    if suffix == ".json":
        payload = json.dumps(to_dict(traj, spec_raw, extra), indent=1, default=_default).encode()
    elif suffix == ".csv":
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["record", "label", "block", "measure", "position", "value"])
        w.writerows(tidy_rows(traj))
        payload = text.getvalue().encode()
    else:
        if traj.kernels is None:
            raise SpecError("output", str(path), ".npz holds the full kernels; run with kernels kept")
        npz = io.BytesIO()
        arrays = {"kernels": traj.kernels, "means": traj.means, "labels": np.array(traj.labels),
                  "blocks": traj.blocks, "segments": np.array(traj.segments),
                  "meta": np.array(json.dumps({"versions": versions(), "spec": spec_raw,
                                               "input": traj.inputs.description, **(extra or {})},
                                              default=_default))}
        arrays.update({f"measure_{k}": v for k, v in traj.measures.items()})
        if getattr(traj, "ntk", None) is not None:
            arrays["ntk"] = traj.ntk
        np.savez_compressed(npz, **arrays)
        payload = npz.getvalue()
    atomic_write(path, payload)
    return path


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def atomic_write(path: Path, payload: bytes):
    """Write ``payload`` to ``path`` through a temporary file in the same directory and a rename, so a
    failure leaves no partial file; an :class:`OSError` becomes a :class:`SpecError` naming ``output``."""
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise SpecError("output", str(path), f"cannot be written ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SpecError("output", str(path), f"cannot be written ({exc.strerror or exc})") from None
        raise


def write_dataset(traj, path, spec_raw=None, extra=None) -> Path:
    """Write ``traj`` as a labelled xarray Dataset, ``.nc`` (netCDF via h5netcdf) or ``.zarr``
    (extra ``kernelprop[xarray]``): dimension ``record`` (coordinates ``label``, ``block``), one
    variable per measure (``(record,)``, profiles ``(record, position)``), ``mean`` ``(record,
    token)``, and ``kernel`` (and ``ntk``) ``(record, token, token_)`` when kept; metadata as
    JSON in the attribute ``kernelprop``. Atomic, like :func:`write`."""
    from ..sweep.labelled import save_dataset, xarray
    xr = xarray()
    n = len(traj.labels)
    data: dict[str, tuple] = {}
    for name, v in traj.measures.items():
        v = np.asarray(v, dtype=np.float64)
        data[name] = (("record",) if v.ndim == 1 else ("record", "position"), v)
    data["mean"] = (("record", "token"), np.asarray(traj.means, dtype=np.float64))
    if traj.kernels is not None:
        data["kernel"] = (("record", "token", "token_"), np.asarray(traj.kernels, dtype=np.float64))
    if getattr(traj, "ntk", None) is not None:
        data["ntk"] = (("record", "token", "token_"), np.asarray(traj.ntk, dtype=np.float64))
    coords = {"record": np.arange(n), "label": ("record", np.array([str(x) for x in traj.labels])),
              "block": ("record", np.asarray(traj.blocks, dtype=np.int64))}
    meta = {k: v for k, v in to_dict(traj, spec_raw, extra).items() if k != "records"}
    ds = xr.Dataset(data, coords=coords, attrs={"kind": "kernelprop run",
                                                "kernelprop": json.dumps(meta, default=_default)})
    return save_dataset(ds, path)
