"""The result of a sweep (:class:`Axis`, :class:`SweepResult`) and its files: written as ``.csv``
(tidy rows), ``.json`` (metadata + rows), ``.npz`` (grids) or, labelled with xarray, ``.nc``
(netCDF) or ``.zarr`` (:mod:`kernelprop.sweep.labelled`), read back by :func:`load`."""

from __future__ import annotations

import dataclasses
import io as _io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SpecError
from ..io.results import _default, atomic_write, versions

DEPTH_NAMES = ("L", "depth")
RESULT_FORMATS = (".csv", ".json", ".npz", ".nc", ".zarr")
DEPTH_LABEL = "depth $L$ (blocks)"


def axis_label(name: str, where: str | None = None) -> str:
    """Label of a swept parameter: depth, or the param name and where the network uses it."""
    if name in DEPTH_NAMES:
        return DEPTH_LABEL
    return f"{name}  ({where})" if where else name


@dataclass(frozen=True, eq=False)
class Axis:
    """One swept parameter: its ``name`` (a param, or ``L``/``depth``), ``values``, ``spacing``
    (``"linear"``, ``"log"`` or ``"list"``) and an axis ``label`` saying where the network uses it."""

    name: str
    values: np.ndarray
    spacing: str = "linear"
    label: str = ""

    @property
    def is_depth(self) -> bool:
        return self.name in DEPTH_NAMES

    def to_dict(self) -> dict:
        vals = [int(v) if self.is_depth else float(v) for v in self.values]
        return {"name": self.name, "values": vals, "spacing": self.spacing, "label": self.label}


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Result of :func:`sweep`: ``values[measure]`` is an array of shape ``shape`` (one entry per axis).

    ``runs`` counts the propagations done, ``plan`` says what was shared and what rerun,
    ``failures`` lists the points that failed numerically (their values are NaN), ``cached`` counts
    the runs read from a sweep cache instead of computed.
    """

    axes: tuple
    values: dict
    at: str
    runs: int
    plan: list
    failures: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    cached: int = 0

    def __getitem__(self, measure: str) -> np.ndarray:
        return self.values[measure]

    @property
    def names(self) -> list:
        return [a.name for a in self.axes]

    @property
    def shape(self) -> tuple:
        return tuple(len(a.values) for a in self.axes)

    @property
    def measures(self) -> list:
        return list(self.values)

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise SpecError("axis", name, f"must be one of {self.names}")

    def rows(self):
        """Tidy rows ``(*axis values, measure, value)``, measures outer, grid points in C order."""
        for m, grid in self.values.items():
            for idx in itertools.product(*(range(n) for n in self.shape)):
                yield (*(_axis_value(a, i) for a, i in zip(self.axes, idx)), m, float(grid[idx]))

    def to_dict(self) -> dict:
        """JSON-ready metadata, axes and tidy rows (non-finite values as ``null``)."""
        head = self._meta()
        rows = [{**dict(zip(self.names, r[:-2])), "measure": r[-2], "value": _finite(r[-1])} for r in self.rows()]
        return {**head, "rows": rows}

    def _meta(self) -> dict:
        return {"kind": "kernelprop sweep", "versions": versions(), **self.meta, "at": self.at,
                "axes": [a.to_dict() for a in self.axes], "measures": self.measures, "runs": self.runs,
                "plan": list(self.plan), "failures": list(self.failures), "cached": self.cached}

    def to_xarray(self):
        """An ``xarray.Dataset``: a dimension per axis, a variable per measure (``kernelprop[xarray]``)."""
        from .labelled import sweep_dataset
        return sweep_dataset(self)

    def write(self, path) -> Path:
        """Write as ``.csv`` (tidy: one column per axis, ``measure``, ``value``), ``.json`` (metadata
        + the same rows), ``.npz`` (``axis_names``, ``axis_<name>``, ``values_<measure>`` grids,
        ``meta`` JSON), or ``.nc``/``.zarr`` (:meth:`to_xarray`); atomically, so a failure leaves no
        file."""
        path = Path(path)
        suffix = check_format(path)
        if suffix in (".nc", ".zarr"):
            from .labelled import save_dataset
            return save_dataset(self.to_xarray(), path)
        if suffix == ".csv":
            text = _io.StringIO()
            text.write(",".join([*self.names, "measure", "value"]) + "\n")
            for r in self.rows():
                text.write(",".join([*(repr(v) for v in r[:-2]), r[-2], repr(r[-1])]) + "\n")
            payload = text.getvalue().encode()
        elif suffix == ".json":
            payload = json.dumps(self.to_dict(), indent=1, default=_default).encode()
        else:
            npz = _io.BytesIO()
            arrays = {"axis_names": np.array(self.names), "meta": np.array(json.dumps(self._meta(), default=_default))}
            arrays.update({f"axis_{a.name}": np.asarray(a.values) for a in self.axes})
            arrays.update({f"values_{m}": g for m, g in self.values.items()})
            np.savez_compressed(npz, **arrays)  # type: ignore[arg-type]  # keys are array names, never allow_pickle
            payload = npz.getvalue()
        atomic_write(path, payload)
        return path


def _axis_value(axis, i):
    v = axis.values[i]
    return int(v) if axis.is_depth else float(v)


def _finite(v):
    return v if math.isfinite(v) else None


def check_format(path, field: str = "output") -> str:
    """The result format of ``path`` (.csv, .json, .npz); :class:`SpecError` naming ``field`` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in RESULT_FORMATS:
        raise SpecError(field, str(path), f"extension must be one of {list(RESULT_FORMATS)}")
    return suffix




def _infer_spacing(vals) -> str:
    if len(vals) < 3:
        return "linear"
    v = np.sort(np.asarray(vals, dtype=float))
    lin = np.diff(v)
    if np.all(v > 0):
        lg = np.diff(np.log(v))
        if np.std(lg) / max(np.mean(lg), 1e-300) < np.std(lin) / max(np.mean(lin), 1e-300) * 0.5:
            return "log"
    return "linear"



# ----------------------------------------------------------------------------------------------
# reading a sweep back


def load(path) -> SweepResult:
    """Read a sweep written by :meth:`SweepResult.write` (.csv, .json, .npz, .nc or .zarr)."""
    path = Path(path)
    suffix = check_format(path)
    try:
        if suffix in (".nc", ".zarr"):
            from .labelled import load_dataset
            return load_dataset(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "axis_names" not in z.files:
                    raise SpecError("result", str(path), "is not a sweep (.npz without axis_names)")
                meta = json.loads(str(z["meta"]))
                names = [str(n) for n in z["axis_names"]]
                info = {a["name"]: a for a in meta.get("axes", [])}
                axes = tuple(Axis(n, z[f"axis_{n}"], info.get(n, {}).get("spacing", "linear"),
                                  info.get(n, {}).get("label", "")) for n in names)
                values = {k[len("values_"):]: z[k] for k in z.files if k.startswith("values_")}
            return _result(axes, values, meta)
        if suffix == ".json":
            data = json.loads(path.read_text())
            if data.get("kind") != "kernelprop sweep":
                raise SpecError("result", str(path), "is not a sweep (.json without kind = \"kernelprop sweep\")")
            axes = tuple(Axis(a["name"], np.asarray(a["values"], dtype=int if a["name"] in DEPTH_NAMES else float),
                              a.get("spacing", "linear"), a.get("label", "")) for a in data["axes"])
            values = {m: np.full(tuple(len(a.values) for a in axes), np.nan) for m in data["measures"]}
            pos = [{v: i for i, v in enumerate(a.values.tolist())} for a in axes]
            for row in data["rows"]:
                idx = tuple(p[row[a.name]] for p, a in zip(pos, axes))
                values[row["measure"]][idx] = np.nan if row["value"] is None else row["value"]
            return _result(axes, values, data)
        return _load_csv(path)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError("result", str(path), f"cannot be read as a sweep ({exc})") from None


def _load_csv(path) -> SweepResult:
    lines = path.read_text().splitlines()
    if not lines:
        raise SpecError("result", str(path), "is empty")
    header = lines[0].split(",")
    if header[-2:] != ["measure", "value"] or len(header) not in (3, 4) or header[0] == "record":
        raise SpecError("result", str(path), "is not a sweep (header must be NAME[,NAME2],measure,value)")
    names = header[:-2]
    cols: list[list[float]] = [[] for _ in names]
    rows = []
    for line in lines[1:]:
        *cells, m, v = line.split(",")
        xs = [float(x) for x in cells]
        for c, x in zip(cols, xs):
            if x not in c:
                c.append(x)
        rows.append((xs, m, float(v)))
    axes = tuple(Axis(n, np.asarray(c, dtype=int if n in DEPTH_NAMES else float), _infer_spacing(c),
                      "") for n, c in zip(names, cols))
    measures = list(dict.fromkeys(m for _, m, _ in rows))
    values = {m: np.full(tuple(len(c) for c in cols), np.nan) for m in measures}
    pos = [{v: i for i, v in enumerate(c)} for c in cols]
    for xs, m, v in rows:
        values[m][tuple(p[x] for p, x in zip(pos, xs))] = v
    return _result(axes, values, {})


def _result(axes, values, meta) -> SweepResult:
    axes = tuple(a if a.label else dataclasses.replace(a, label=axis_label(a.name)) for a in axes)
    keep = {k: v for k, v in meta.items() if k in ("spec", "input", "depth", "params", "versions")}
    return SweepResult(axes=axes, values=values, at=meta.get("at", "block"), runs=meta.get("runs", 0),
                       plan=meta.get("plan", []), failures=meta.get("failures", []), meta=keep,
                       cached=meta.get("cached", 0))
