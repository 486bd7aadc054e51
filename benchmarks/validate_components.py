"""Validate Kedia et al. 2024's per-component moment formulas against the numpy simulator.

Usage: python benchmarks/validate_components.py [--quick] [--only NAME ...] [--csv FILE]

For every component of ``kernelprop.methods.components.COMPONENTS`` and every point of its grid
(``grid_points``), the component is simulated once (``simulate``: fresh weights per seed, moments
pooled over features and seeds, jackknife standard errors) and compared with the formula and its
variants (``form=`` for softmax, ``finite_width=`` for LayerNorm, ``corrected=`` for attention).
Errors are normalised as in ``moment_errors`` (var, var_g relative; mu relative to
max(|mu'|, sigma'); r, r_g absolute). Percentiles use the authors' rule ``sorted[int(n q/100)]``.

Printed (stdout): a Markdown table, one row per component, variant and moment, with the 50th/90th/
99th percentile of the error, the Monte Carlo standard error in the same units (median and 99th
percentile over the grid) and the 50th/99th percentile of ``|z| = |formula − simulation|/SE``.
For a formula that is exact, |z| is half-normal (p50 ≈ 0.67, p99 ≈ 2.6) and the errors are the
simulation noise; a formula error shows as |z| ≫ 3. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import numpy as np

from kernelprop.methods import components as C

WIDTH = 256          # input width where the grid does not set one (d of the elementwise components)
TOKENS = 16          # T where the grid does not set it
SEEDS = {"linear": 256, "relu": 128, "gelu": 128, "layernorm": 128, "dropout": 128, "softmax": 128,
         "attention": 128}
SEED = 20240314

VARIANTS = {
    "softmax": [("form=approx (Kedia)", {}), ("form=full (Kedia)", {"form": "full"}),
                ("form=corrected", {"form": "corrected"})],
    "layernorm": [("Kedia", {}), ("finite_width", {"finite_width": True})],
    "attention": [("Kedia", {}), ("corrected", {"corrected": True})],
}

# sub-regimes reported as extra rows (name, predicate on a grid point)
SUBSETS = {
    "softmax": [("s² ≤ 1", lambda pt: (1 - pt["r"]) * pt["var"] <= 1),
                ("s² ≤ 1, T = 256", lambda pt: (1 - pt["r"]) * pt["var"] <= 1 and pt["tokens"] == 256)],
    "layernorm": [("d = 256", lambda pt: pt["width"] == 256)],
    "attention": [("s² ≤ 0.15", lambda pt: C.logit_variance(pt["var"], pt["r"], sigma_q=pt["sigma_q"],
                                                              sigma_k=pt["sigma_q"]) <= 0.15)],
}


def percentile(values, q):
    """The authors' rule: ``sorted(values)[int(n q / 100)]`` (clipped to the last element)."""
    v = np.sort(np.asarray(values, dtype=float))
    return float(v[min(len(v) - 1, int(len(v) * q / 100))])


def run_component(name, quick=False, progress=True):
    """Simulate every grid point of ``name``; return a list of records (one per point and variant)."""
    comp = C.COMPONENTS[name]
    points = C.grid_points(name)
    if quick:
        points = points[::max(1, len(points) // 12)]
    seeds = max(8, SEEDS[name] // (4 if quick else 1))
    records = []
    t0 = time.perf_counter()
    for k, pt in enumerate(points):
        fwd = {m: pt[m] for m in C.MOMENTS if m in pt}
        params = {p: v for p, v in pt.items() if p not in C.MOMENTS}
        width = params.pop("d_in", params.pop("width", WIDTH))
        tokens = params.pop("tokens", TOKENS)
        sim = C.simulate(name, **fwd, width=width, tokens=tokens, seeds=seeds, seed=SEED + k, **params)
        resolved = {p: v for p, v in sim.settings.items() if p in comp.params}
        point = {**pt, "width": width, "tokens": tokens}
        for label, opts in VARIANTS.get(name, [("Kedia", {})]):
            f = C.predict(name, **fwd, **resolved, **opts)
            f = C.Moments(*[float(x) for x in f])
            err, se = C.moment_errors(f, sim.value, sim.stderr)
            z = [abs(a - b) / e if e > 1e-10 * max(abs(a), abs(b), 1e-300) else 0.0
                 for a, b, e in zip(f, sim.value, sim.stderr)]
            records.append({"component": name, "variant": label, "point": point, "formula": f,
                            "sim": sim.value, "stderr": sim.stderr, "error": err, "se": se,
                            "z": C.Moments(*z)})
        if progress and (k + 1) % max(1, len(points) // 10) == 0:
            print(f"  {name}: {k + 1}/{len(points)} points, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
    return records


def summarise(records):
    """Rows of the Markdown table: (component, variant, subset, moment, n, stats dict).

    The default formula gets every moment over the whole grid; sub-regimes and the other variants
    are shown only for the moments where the formula is approximate (``Component.approximate``)."""
    rows = []
    groups = {}
    for rec in records:
        groups.setdefault((rec["component"], rec["variant"]), []).append(rec)
    first = {}
    for name, variant in groups:
        first.setdefault(name, variant)
    for (name, variant), recs in groups.items():
        subsets = [("all", recs)] + [(label, [r for r in recs if pred(r["point"])])
                                     for label, pred in SUBSETS.get(name, [])]
        for label, sub in subsets:
            if not sub:
                continue
            full = variant == first[name] and label == "all"
            for m in C.MOMENTS if full else C.COMPONENTS[name].approximate:
                err = [getattr(r["error"], m) for r in sub]
                se = [getattr(r["se"], m) for r in sub]
                z = [getattr(r["z"], m) for r in sub]
                rows.append((name, variant, label, m, len(sub), {
                    "p50": percentile(err, 50), "p90": percentile(err, 90), "p99": percentile(err, 99),
                    "se50": percentile(se, 50), "se99": percentile(se, 99),
                    "z50": percentile(z, 50), "z99": percentile(z, 99)}))
    return rows


def fmt(x):
    if x == 0:
        return "0"
    if x < 0.01:
        return f"{x:.1e}"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.0f}"


def markdown(rows):
    head = ("| component | formula | points | moment | p50 % | p90 % | p99 % | MC SE % (p50 / p99) "
            "| \\|z\\| p50 / p99 |\n|---|---|---|---|---:|---:|---:|---:|---:|")
    out = [head]
    for name, variant, label, m, n, s in rows:
        where = "all" if label == "all" else label
        out.append(f"| {name} | {variant} | {where} ({n}) | {m} | {fmt(100 * s['p50'])} | {fmt(100 * s['p90'])} "
                   f"| {fmt(100 * s['p99'])} | {fmt(100 * s['se50'])} / {fmt(100 * s['se99'])} "
                   f"| {fmt(s['z50'])} / {fmt(s['z99'])} |")
    return "\n".join(out)


def write_csv(records, path):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        keys = sorted({k for r in records for k in r["point"]})
        w.writerow(["component", "variant", *keys, "moment", "formula", "simulation", "stderr", "error", "z"])
        for r in records:
            for m in C.MOMENTS:
                w.writerow([r["component"], r["variant"], *[r["point"].get(k, "") for k in keys], m,
                            getattr(r["formula"], m), getattr(r["sim"], m), getattr(r["stderr"], m),
                            getattr(r["error"], m), getattr(r["z"], m)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a dozen points per component, 1/4 of the seeds")
    ap.add_argument("--only", nargs="*", default=None, help="components to run (default: all)")
    ap.add_argument("--csv", default=None, help="also write every comparison to this CSV file")
    args = ap.parse_args(argv)
    names = args.only or list(C.COMPONENTS)
    t0 = time.perf_counter()
    records = []
    for name in names:
        if name not in C.COMPONENTS:
            ap.error(f"unknown component {name!r}; known: {', '.join(C.COMPONENTS)}")
        records += run_component(name, quick=args.quick)
    print(markdown(summarise(records)))
    seeds = ", ".join(f"{n} {SEEDS[n] // (4 if args.quick else 1)}" for n in names)
    print(f"\nseeds per point: {seeds}; width {WIDTH} and T = {TOKENS} unless the grid sets them; "
          f"base seed {SEED}; {time.perf_counter() - t0:.0f} s.")
    if args.csv:
        write_csv(records, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
