"""Read any result file the CLI writes and draw it (the ``kernelprop plot`` command).

=========================  ==========================================  ===================
written by                 recognised by                               default figure
=========================  ==========================================  ===================
``run``/``simulate`` .json  a ``records`` list                          measure vs depth
``run``/``simulate`` .csv   header ``record,label,block,measure,…``     measure vs depth
``run``/``simulate`` .npz   a ``kernels`` array                         kernel heatmaps
``compare`` .csv            header ``block,<preset>,…``                 measure vs depth
``gradients`` .csv          header ``record,block,grad_q_mean,…``       measure vs depth
``moments`` .csv            header ``record,block,mu,…``                measure vs depth
``sweep`` .csv/.json/.npz   ``NAME[,NAME2],measure,value`` / ``kind`` /  phase diagram (2-D)
                           ``axis_names``                              or line (1-D)
``run``/``sweep`` .nc/.zarr attribute ``kind`` (extra ``xarray``)       as above
=========================  ==========================================  ===================

Simulation results carry ``<measure>_se`` columns; they are drawn as error bars.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SpecError

RESULT_FORMATS = (".json", ".csv", ".npz", ".nc", ".zarr")
KINDS = ("auto", "depth", "kernels", "spectrum", "phase")


@dataclass
class Records:
    """A run read back from a file: what :func:`~kernelprop.plotting.depth_plot` needs."""

    labels: list
    blocks: np.ndarray
    measures: dict
    name: str = ""
    kernels: np.ndarray | None = None
    segments: tuple = ()
    extra: dict = field(default_factory=dict)


def read(path):
    """``(kind, data)``: ``("run", Records)``, ``("compare", {name: Records})`` or ``("sweep", SweepResult)``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RESULT_FORMATS:
        raise SpecError("path", str(path), f"extension must be one of {list(RESULT_FORMATS)}")
    if not (path.is_dir() if suffix == ".zarr" else path.is_file()):
        raise SpecError("path", str(path), "does not exist")
    try:
        if suffix in (".nc", ".zarr"):
            return _read_dataset(path)
        if suffix == ".npz":
            return _read_npz(path)
        if suffix == ".json":
            return _read_json(path)
        return _read_csv(path)
    except SpecError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SpecError("path", str(path),
                        f"cannot be read as a kernelprop result ({type(exc).__name__}: {exc})") from None


def _read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        if "axis_names" in files:
            from ..sweep import load
            return "sweep", load(path)
        if "labels" not in files:
            raise SpecError("path", str(path), "is not a result written by run, simulate or sweep")
        meta = json.loads(str(z["meta"])) if "meta" in files else {}
        measures = {k[len("measure_"):]: z[k] for k in files if k.startswith("measure_")}
        rec = Records(labels=[str(x) for x in z["labels"]], blocks=z["blocks"], measures=measures,
                      name=_name(meta.get("spec"), path), kernels=z["kernels"] if "kernels" in files else None,
                      segments=tuple(int(t) for t in z["segments"]) if "segments" in files else (),
                      extra=meta)
    return "run", rec


def _read_dataset(path):
    """A labelled result (:func:`kernelprop.io.results.write_dataset`, :meth:`SweepResult.write`)."""
    from ..sweep.labelled import open_dataset
    ds = open_dataset(path)
    kind = ds.attrs.get("kind")
    if kind == "kernelprop sweep":
        from ..sweep import load
        return "sweep", load(path)
    if kind != "kernelprop run":
        raise SpecError("path", str(path), "is not a result written by run, simulate or sweep (attribute kind is "
                        f"{kind!r})")
    meta = json.loads(ds.attrs.get("kernelprop", "{}"))
    skip = {"mean", "kernel", "ntk"}
    measures = {k: np.asarray(v.values, dtype=float) for k, v in ds.data_vars.items() if k not in skip}
    kernels = np.asarray(ds["kernel"].values) if "kernel" in ds.data_vars else None
    segments = tuple(int(t) for t in meta.get("input", {}).get("segments", ()))
    return "run", Records([str(x) for x in ds["label"].values], np.asarray(ds["block"].values, dtype=int), measures,
                          _name(meta.get("spec"), path), kernels=kernels, segments=segments, extra=meta)


def _read_json(path):
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.get("kind") == "kernelprop sweep":
        from ..sweep import load
        return "sweep", load(path)
    if not isinstance(data, dict) or "records" not in data:
        raise SpecError("path", str(path), "is not a result written by run, simulate or sweep")
    rows = data["records"]
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("record", "label", "block")))
    measures = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if any(isinstance(v, list) for v in vals):
            width = max(len(v) for v in vals if isinstance(v, list))
            measures[k] = np.array([[np.nan if x is None else x for x in v] if isinstance(v, list)
                                    else [np.nan] * width for v in vals], dtype=float)
        else:
            measures[k] = np.array([np.nan if v is None else v for v in vals], dtype=float)
    name = _name(data.get("spec"), path)
    sim = data.get("simulation")
    if isinstance(sim, dict):
        detail = ", ".join(x for x in (f"d = {sim['width']}" if "width" in sim else "",
                                       f"{sim['seeds']} seeds" if "seeds" in sim else "") if x)
        name += f" (simulation{', ' + detail if detail else ''})"
    return "run", Records([r["label"] for r in rows], np.array([r["block"] for r in rows]), measures, name,
                          segments=tuple(data.get("input", {}).get("segments", ())), extra=data)


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise SpecError("path", str(path), "is empty")
    header = rows[0]
    if header == ["record", "label", "block", "measure", "position", "value"]:
        return "run", _run_csv(rows[1:], path)
    if header[-2:] == ["measure", "value"]:
        from ..sweep import load
        return "sweep", load(path)
    if header[0] == "block" and len(header) > 1:
        blocks = np.array([int(r[0]) for r in rows[1:]])
        labels = ["input" if b == 0 else f"block {b}" for b in blocks]
        out = {}
        for j, name in enumerate(header[1:], start=1):
            out[name] = Records(labels, blocks, {"value": np.array([float(r[j]) for r in rows[1:]])}, name)
        return "compare", out
    from ..io.tables import PER_RECORD, read_csv
    if any(header[:len(h)] == list(h) for h in PER_RECORD.values()):   # gradients or moments
        _, labels, blocks, columns = read_csv(path)
        return "run", Records(labels, blocks, columns, path.stem)
    raise SpecError("path", str(path), "is not a result written by run, simulate, gradients, moments, compare or "
                    "sweep (unknown CSV header)")


def _run_csv(rows, path):
    labels, blocks, index = [], [], {}
    for r in rows:
        rec = int(r[0])
        if rec not in index:
            index[rec] = len(labels)
            labels.append(r[1])
            blocks.append(int(r[2]))
    scalars, profiles = {}, {}
    for rec, _, _, m, pos, v in rows:
        i = index[int(rec)]
        if pos == "":
            scalars.setdefault(m, np.full(len(labels), np.nan))[i] = float(v)
        else:
            profiles.setdefault(m, {})[(i, int(pos))] = float(v)
    measures = dict(scalars)
    for m, cells in profiles.items():
        width = max(p for _, p in cells) + 1
        a = np.full((len(labels), width), np.nan)
        for (i, p), v in cells.items():
            a[i, p] = v
        measures[m] = a
    return Records(labels, np.array(blocks), measures, path.stem)


def _name(spec, path) -> str:
    if isinstance(spec, dict):
        if spec.get("name"):
            return str(spec["name"])
        if spec.get("preset"):
            return str(spec["preset"])
    return Path(path).stem


def plot_files(paths, *, kind: str = "auto", measure: str | None = None, depths=None, logx: bool = False,
               logy: bool = False, labels=None, x: str | None = None, position: int | None = None):
    """The figure for one or several result files (several: overlaid measure-vs-depth curves,
    e.g. a theory run and a simulation). ``depths``: block indices, or a comma-separated string of them.
    Returns the figure."""
    from .depth import depth_plot
    from .kernels import kernel_heatmaps, spectrum_plot
    from .phase import phase_diagram
    if isinstance(depths, str):
        try:
            depths = [int(d) for d in depths.split(",")]
        except ValueError:
            raise SpecError("depths", depths, "must be comma-separated block indices, e.g. 0,4,32") from None
    if kind not in KINDS:
        raise SpecError("kind", kind, f"must be one of {list(KINDS)}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise SpecError("paths", None, "give at least one result file")
    read_ = [(p, *read(p)) for p in paths]
    kinds = {k for _, k, _ in read_}
    if kind == "auto":
        if kinds == {"sweep"}:
            kind = "phase"
        elif len(read_) == 1 and read_[0][1] == "run" and read_[0][2].kernels is not None and measure is None:
            kind = "kernels"
        else:
            kind = "depth"
    if kind in ("kernels", "spectrum", "phase") and len(read_) > 1:
        raise SpecError("paths", [str(p) for p in paths], f"--kind {kind} draws one file")
    if kind == "phase":
        if read_[0][1] != "sweep":
            raise SpecError("kind", kind, f"needs a sweep result; {paths[0]} is a {read_[0][1]} result")
        return phase_diagram(read_[0][2], measure, x=x, logx=logx or None, logy=logy or None)
    if kind in ("kernels", "spectrum"):
        rec = read_[0][2]
        if read_[0][1] != "run" or rec.kernels is None:
            raise SpecError("kind", kind, "needs kernels: write the run as .npz or .nc "
                            "(`kernelprop run SPEC -o x.npz`)")
        src = {"kernels": rec.kernels, "labels": rec.labels, "blocks": rec.blocks,
               "segments": rec.segments or (rec.kernels.shape[-1],)}
        return kernel_heatmaps(src, depths) if kind == "kernels" else spectrum_plot(src, depths)
    if "sweep" in kinds:
        raise SpecError("kind", kind, "a sweep is drawn as a phase diagram; plot it on its own")
    curves = {}
    ylabel = None
    for _, k, data in read_:
        items = data.items() if k == "compare" else [(data.name, data)]
        for name, rec in items:
            key = name
            n = 2
            while key in curves:
                key = f"{name} ({n})"
                n += 1
            curves[key] = rec
        if k == "compare":
            from .labels import measure_label
            ylabel = measure_label(measure) if measure else "measure tabulated by `compare` (see its --measure)"
    m = measure or "cos_mean"
    plot_measure = {key: ("value" if "value" in rec.measures and len(rec.measures) == 1 else m)
                    for key, rec in curves.items()}
    if labels:
        if len(labels) != len(curves):
            raise SpecError("labels", list(labels), f"needs one label per curve ({len(curves)}: {list(curves)})")
        curves = dict(zip(labels, curves.values()))
        plot_measure = dict(zip(labels, plot_measure.values()))
    for key, rec in curves.items():
        if plot_measure[key] not in rec.measures:
            raise SpecError("measure", m, f"must be one of {sorted(k for k in rec.measures if not k.endswith('_se'))}")
    # one measure name per call: rename the compare column to the chosen measure
    data = {}
    for key, rec in curves.items():
        pm = plot_measure[key]
        meas = {m: rec.measures[pm]}
        if pm + "_se" in rec.measures:
            meas[m + "_se"] = rec.measures[pm + "_se"]
        data[key] = Records(rec.labels, rec.blocks, meas, key)
    return depth_plot(data, m, logx=logx, logy=logy, ylabel=ylabel, position=position)
