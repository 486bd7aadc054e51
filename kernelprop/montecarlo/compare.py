"""Theory against simulation: z-scores and a verdict with a stated family-wise false-alarm rate.

Criterion (docs/montecarlo.md). Each compared quantity q (every kernel entry Σ_ij, i ≤ j, every
token mean m_i, and the smooth measures below, at every record) gives
``z = (q̂ − q_theory) / SE``. The simulation estimate q̂ removes the O(1/d) finite-width bias by
Richardson extrapolation over two independent runs at widths d and d' < d (default d' = d/2):
``q̂ = (d q_d − d' q_d')/(d − d')`` with ``SE² = (d SE_d)² + (d' SE_d')²)/(d − d')²``; the bias
at width d, ``q_d − q̂``, is reported separately. Theory and simulation agree when every
comparison has ``|q̂ − q| ≤ k·sqrt(SE² + e²) + atol + rtol·|q|`` (e: the engine's own error
estimate at that record — quadrature, or the standard error of its draws of random scores) with the
Bonferroni bound
``k = t⁻¹_ν(1 − α/(2n))``: n comparisons, ν = S − 1 degrees of freedom of the smaller run, α the
family-wise false-alarm rate (default 0.01). atol/rtol are a float-noise floor.

Gradients (:func:`compare_gradients`, ``check(..., gradients=True)``): every entry of the gradient
kernel Π (i ≤ j), ``grad_q_mean``, ``grad_cos_mean``, ``grad_cos_first`` at every record of
:func:`kernelprop.kernel.backward.backpropagate`, and the per-block parameter-gradient norms
``‖∂L/∂W‖²/d`` of every kind (dense, values, output, queries), against
:func:`~kernelprop.montecarlo.backward.simulate_gradients`, with the same estimate, bias removal and
threshold; ``check`` judges forward and backward rows together (one Bonferroni n).

Only measures that are smooth functions of (Σ, m) have an O(1/d) bias and enter the verdict. Minima,
maxima and spectral edges (q_min, q_max, cos_min, stable_rank, eig_ratio, effective_rank near zero
eigenvalues) and mean_abs at m = 0 are biased by O(d^-1/2) at ties — they are shown, marked "info".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..errors import KernelpropError, NotSupportedError, SpecError

TESTED = ("q_mean", "cos_mean", "cross_cos_mean", "rank_one_distance", "cos_first", "q_position")
GRAD_TESTED = ("grad_q_mean", "grad_cos_mean", "grad_cos_first")
GRAD_INFO = {"grad_q_min": "a minimum over tokens: bias O(d^-1/2) at ties",
             "grad_q_max": "a maximum over tokens: bias O(d^-1/2) at ties"}
GRAD_KINDS = ("dense", "values", "output", "queries")
INFO = {
    "q_min": "a minimum over tokens: bias O(d^-1/2) at ties",
    "q_max": "a maximum over tokens: bias O(d^-1/2) at ties",
    "cos_min": "a minimum over pairs: bias O(d^-1/2) at ties",
    "stable_rank": "λ_max: bias O(d^-1/2) at a degenerate top eigenvalue",
    "eig_ratio": "λ_min/λ_max: spectral edges are biased O(d^-1/2) (Marchenko–Pastur)",
    "effective_rank": "sqrt(λ) is not smooth at λ = 0",
    "mean_abs": "|m_i| is not smooth at m_i = 0",
}
ATOL, RTOL = 1e-12, 1e-9


@dataclass(frozen=True)
class Row:
    """One comparison: ``measure`` at ``record`` (``position`` = token, or ``(i, j)`` for kernel entries)."""

    record: int
    label: str
    measure: str
    position: object
    theory: float
    estimate: float
    se: float
    z: float
    bias: float
    bias_se: float
    tested: bool
    ok: bool


@dataclass(frozen=True, eq=False)
class Comparison:
    """Every comparison row, the threshold k and the verdict ``agree``."""

    rows: list
    k: float
    alpha: float
    n_tested: int
    dof: int
    widths: tuple
    seeds: tuple
    extrapolated: bool
    labels: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)   # check(gradients=True): "forward" and "gradients", same k

    @property
    def agree(self) -> bool:
        return all(r.ok for r in self.rows if r.tested)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.tested and not r.ok]

    @property
    def max_abs_z(self) -> float:
        zs = [abs(r.z) for r in self.rows if r.tested and np.isfinite(r.z)]
        return max(zs) if zs else 0.0

    def criterion(self) -> str:
        how = (f"Richardson-extrapolated from widths {self.widths[0]} and {self.widths[1]}" if self.extrapolated
               else f"raw width {self.widths[0]} (no bias correction)")
        return (f"|z| <= k = {self.k:.2f}: Bonferroni over {self.n_tested} comparisons at family-wise "
                f"false-alarm rate {self.alpha:g}, Student t with {self.dof} dof; estimate {how}; "
                f"SE combined with the engine's error estimate; floor {ATOL:g} + {RTOL:g}·|theory|")

    def worst(self) -> dict:
        """Per (record, measure) the row with the largest |z| (kernel entries and means collapsed)."""
        out: dict[tuple[int, str], Row] = {}
        for row in self.rows:
            key = (row.record, row.measure)
            if key not in out or _zkey(row) > _zkey(out[key]):
                out[key] = row
        return out


def _zkey(row):
    return abs(row.z) if np.isfinite(row.z) else math.inf


def compare(theory, sim, half=None, *, alpha: float = 0.01, atol: float = ATOL, rtol: float = RTOL) -> Comparison:
    """Compare a :class:`~kernelprop.kernel.propagate.Trajectory` with a :class:`Simulation`.

    ``half``: a second, independent simulation at a smaller width for the Richardson estimate
    (recommended; without it the raw width-d means are compared and the O(1/d) bias is ignored).
    """
    _check_alpha(alpha)
    raw = _forward_raw(theory, sim, half, atol, rtol)
    return _judge([(raw, list(sim.labels))], sim, half, alpha)[0]


def compare_gradients(theory, sim, half=None, *, alpha: float = 0.01, atol: float = ATOL,
                      rtol: float = RTOL) -> Comparison:
    """Compare a :class:`~kernelprop.kernel.backward.GradientTrajectory` with a
    :class:`~kernelprop.montecarlo.backward.GradientSimulation` (``half``: the narrower run).

    Rows: measure ``grad_kernel`` (every Π_ij, i ≤ j), ``grad_q_mean``, ``grad_cos_mean``,
    ``grad_cos_first`` (tested), ``grad_q_min``, ``grad_q_max`` (info) at every record, and
    ``norm_<kind>`` per block (record label ``block l``, ``stem`` or ``final``) for every kind present
    in both. The engine's error allowance is its forward ``quad_error`` relative to the kernel scale
    (non-zero only for ``scores = "standard"``), applied to every gradient quantity in proportion.
    """
    _check_alpha(alpha)
    raw, labels = _gradient_raw(theory, sim, half, atol, rtol)
    return _judge([(raw, labels)], sim, half, alpha)[0]


def _check_alpha(alpha):
    if not (0 < alpha < 1):
        raise SpecError("alpha", alpha, "must lie in (0, 1)")


def _pair(sim, half):
    """Richardson weights ``(a, b)`` with ``q̂ = a q_d − b q_d'``, or None without a half run."""
    if half is None:
        return None
    d1, d2 = sim.width, half.width
    if not d2 < d1:
        raise SpecError("width", d1, f"the bias-correcting run must be narrower (it has width {d2}): "
                        "raise --width, or use --no-extrapolate")
    return d1 / (d1 - d2), d2 / (d1 - d2)


def _combine(ab, v1, s1, v2=None, s2=None):
    """``(estimate, se, bias at width d, se of the bias)``."""
    if ab is None:
        return v1, s1, np.zeros_like(v1), np.zeros_like(v1)
    a, b = ab
    est = a * v1 - b * v2
    return est, np.sqrt((a * s1) ** 2 + (b * s2) ** 2), v1 - est, np.sqrt(s1 ** 2 + s2 ** 2)


def _append(raw, ab, r, label, name, pos, th, v1, s1, v2, s2, tested, atol, rtol, err):
    """Rows ``(record, label, measure, position, theory, est, se, bias, bias_se, tested, floor, err)``."""
    est, se, bias, bse = _combine(ab, v1, s1, v2, s2)
    for j, p in enumerate(pos):
        e = float(err[j]) if np.ndim(err) else float(err)
        raw.append((r, label, name, p, float(th[j]), float(est[j]), float(se[j]), float(bias[j]),
                    float(bse[j]), tested, atol + rtol * abs(float(th[j])), e))


def _forward_raw(theory, sim, half, atol, rtol):
    if list(theory.labels) != list(sim.labels) or (half is not None and list(half.labels) != list(sim.labels)):
        raise KernelpropError("the simulation was recorded at other points than the theory; use the same record/every")
    if theory.kernels is None or sim.kernels is None or (half is not None and half.kernels is None):
        raise KernelpropError("compare needs the kernels of both (keep_kernels=True)")
    ab = _pair(sim, half)
    quad = theory.measures.get("quad_error", np.zeros(len(theory.labels)))
    raw = []
    iu = np.triu_indices(sim.kernels.shape[-1])
    for r, label in enumerate(sim.labels):
        q = float(quad[r]) if np.ndim(quad) else 0.0
        parts = [("kernel", theory.kernels[r][iu], sim.kernels[r][iu], sim.kernel_stderr[r][iu],
                  None if half is None else half.kernels[r][iu], None if half is None else half.kernel_stderr[r][iu],
                  [(int(i), int(j)) for i, j in zip(*iu)], True),
                 ("mean", theory.means[r], sim.means[r], sim.mean_stderr[r],
                  None if half is None else half.means[r], None if half is None else half.mean_stderr[r],
                  list(range(len(theory.means[r]))), True)]
        for name in list(TESTED) + list(INFO):
            if name not in theory.measures or name not in sim.measures:
                continue
            th = np.atleast_1d(theory.measures[name][r])
            pos = list(range(th.size)) if np.ndim(theory.measures[name][r]) else [""]
            parts.append((name, th, np.atleast_1d(sim.measures[name][r]), np.atleast_1d(sim.stderr[name][r]),
                          None if half is None else np.atleast_1d(half.measures[name][r]),
                          None if half is None else np.atleast_1d(half.stderr[name][r]), pos, name in TESTED))
        for name, th, v1, s1, v2, s2, pos, tested in parts:
            _append(raw, ab, r, label, name, pos, th, v1, s1, v2, s2, tested, atol, rtol, q)
    return raw


def _relative_engine_error(theory) -> float:
    """The engine's forward error estimate relative to the kernel scale (largest over records)."""
    fwd = getattr(theory, "forward", None)
    if fwd is None or "quad_error" not in fwd.measures:
        return 0.0
    q = np.asarray(fwd.measures["quad_error"], dtype=float)
    scale = np.maximum(np.asarray(fwd.measures["q_mean"], dtype=float), 1e-300)
    return float(np.max(q / scale)) if q.size else 0.0


def _gradient_raw(theory, sim, half, atol, rtol):
    if list(theory.labels) != list(sim.labels) or (half is not None and list(half.labels) != list(sim.labels)):
        raise KernelpropError("the gradient simulation was recorded at other points than the theory; "
                              "use the same every")
    if theory.kernels is None or sim.kernels is None:
        raise KernelpropError("compare_gradients needs the gradient kernels of both (keep_kernels=True)")
    ab = _pair(sim, half)
    eps = _relative_engine_error(theory)
    labels = list(sim.labels)
    raw = []
    iu = np.triu_indices(sim.kernels.shape[-1])
    for r, label in enumerate(labels):
        scale = abs(float(theory.measures["grad_q_mean"][r]))
        rel = float(theory.measures["grad_error"][r]) if "grad_error" in theory.measures else 0.0   # §11.6
        own = rel * float(np.max(np.abs(theory.kernels[r])))
        _append(raw, ab, r, label, "grad_kernel", [(int(i), int(j)) for i, j in zip(*iu)], theory.kernels[r][iu],
                sim.kernels[r][iu], sim.kernel_stderr[r][iu], None if half is None else half.kernels[r][iu],
                None if half is None else half.kernel_stderr[r][iu], True, atol, rtol, eps * scale + own)
        for name in list(GRAD_TESTED) + list(GRAD_INFO):
            if name not in theory.measures or name not in sim.measures:
                continue
            th = np.atleast_1d(theory.measures[name][r])
            pos = list(range(th.size)) if np.ndim(theory.measures[name][r]) else [""]
            _append(raw, ab, r, label, name, pos, th, np.atleast_1d(sim.measures[name][r]),
                    np.atleast_1d(sim.stderr[name][r]), None if half is None else np.atleast_1d(half.measures[name][r]),
                    None if half is None else np.atleast_1d(half.stderr[name][r]), name in GRAD_TESTED, atol, rtol,
                    eps + 2.0 * rel if "cos" in name else eps * scale + own)
    depth = sim.forward.network.depth
    for kind in GRAD_KINDS:
        tl, tv = theory.grad_norms(kind)
        sl, sv, ss = sim.grad_norms(kind)
        if half is not None:
            hl, hv, hs = half.grad_norms(kind)
        for l, th in zip(tl, tv):
            if l not in sl or (half is not None and l not in hl):
                continue
            i = int(np.searchsorted(sl, l))
            label = "stem" if l == 0 else "final" if l == depth + 1 else f"block {l}"
            if label not in labels:
                labels.append(label)
            v2 = s2 = None
            if half is not None:
                j = int(np.searchsorted(hl, l))
                v2, s2 = np.array([hv[j]]), np.array([hs[j]])
            _append(raw, ab, labels.index(label), label, f"norm_{kind}", [""], np.array([th]), np.array([sv[i]]),
                    np.array([ss[i]]), v2, s2, True, atol, rtol, eps * abs(float(th)))
    return raw, labels


def _threshold(n, seeds, alpha):
    dof = max(1, min(seeds) - 1)
    return float(stats.t.isf(alpha / (2 * max(n, 1)), dof)), dof


def _rows(raw, k):
    rows = []
    for r, label, name, p, th, est, se, bias, bse, tested, floor, q in raw:
        diff = est - th
        if not np.isfinite(se):
            se = 0.0
        total = math.hypot(se, q)                   # with the engine's own error (quadrature / score draws)
        excess = max(0.0, abs(diff) - floor)        # z beyond the float-noise floor
        z = math.copysign(excess / total if total > 0 else (0.0 if excess == 0 else math.inf), diff)
        ok = bool(np.isfinite(diff) and abs(diff) <= k * total + floor)
        rows.append(Row(r, label, name, p, th, est, se, z, bias, bse, tested, ok))
    return rows


def _judge(parts, sim, half, alpha):
    """One :class:`Comparison` per ``(raw rows, labels)`` part, all judged with the same Bonferroni k
    over the tested rows of every part."""
    n = sum(1 for raw, _ in parts for x in raw if x[9])
    seeds = (sim.seeds,) if half is None else (sim.seeds, half.seeds)
    k, dof = _threshold(n, seeds, alpha)
    widths = (sim.width,) if half is None else (sim.width, half.width)
    return [Comparison(rows=_rows(raw, k), k=k, alpha=alpha, n_tested=n, dof=dof, widths=widths, seeds=seeds,
                       extrapolated=half is not None, labels=list(labels)) for raw, labels in parts]


def joint(forward: Comparison, gradients: Comparison) -> Comparison:
    """Forward and gradient comparisons judged together (they must share k): rows concatenated, the
    gradient records numbered after the forward ones; ``parts`` keeps the two."""
    off = len(forward.labels)
    rows = list(forward.rows) + [dataclasses.replace(r, record=r.record + off) for r in gradients.rows]
    return dataclasses.replace(forward, rows=rows, labels=list(forward.labels) + list(gradients.labels),
                               parts={"forward": forward, "gradients": gradients})


def gradient_table(cmp: Comparison, most: int = 24, title: str | None = None, width: int | None = None):
    """Rich table of a gradient comparison (``check(..., gradients=True).parts["gradients"]``): per record
    the largest |z| of the gradient-kernel entries (Π), grad_q_mean, grad_cos_mean, grad_cos_first and of
    each per-block parameter-gradient norm ‖∂L/∂W‖²/d (∂W dense, …) (✗ where the criterion fails)."""
    from .tables import z_table
    worst = cmp.worst()
    names = [m for m in ("grad_kernel",) + GRAD_TESTED + tuple(f"norm_{k}" for k in GRAD_KINDS)
             if any(key[1] == m for key in worst)]
    headings = [("Π" if m == "grad_kernel" else m.replace("grad_", "grad\n").replace("norm_", "∂W\n").replace("_", " "))
                + "\n|z|" for m in names]
    return z_table(cmp, names, headings, most, title, width)


def half_width(width: int, network) -> int:
    """The narrower width of the Richardson pair: about d/2, a multiple of every head count."""
    from ..network.layers import Attention, walk
    heads = [1]
    for part in (network.stem, network.block, network.final):
        for _, layer in walk(part):
            if isinstance(layer, Attention):
                heads.append(int(layer.heads))
    step = math.lcm(*heads)
    return max(step, (width // 2) // step * step)


def check(network, inputs, width: int, seeds: int = 32, *, extrapolate: bool = True, alpha: float = 0.01,
          record: str = "blocks", every: int = 1, seed: int = 0, spectral="auto", quad_nodes=None,
          progress=None, gradients: bool = False, output_grad="identity", rho: float = 0.0, **sim_options):
    """Propagate the theory, simulate at ``width`` (and ``half_width`` for the bias) and :func:`compare`.

    Returns ``(comparison, theory, simulation, half_simulation or None)``. Refuses the override
    ``scores="standard"`` (the theory would still use the spec's scores): set ``scores = "standard"``
    on the attention layers instead, whose limit the engine estimates over random score draws.

    ``gradients=True`` also backpropagates (:func:`kernelprop.kernel.backward.backpropagate` from
    ``Π_L = output_grad``, ``rho``) and simulates real backpropagation through the same finite networks
    (:func:`~kernelprop.montecarlo.backward.simulate_gradients`, explicit weights; its forward records
    give the forward comparison). Then ``theory`` is the ``GradientTrajectory`` (``.forward``: the
    forward trajectory), the simulations are ``GradientSimulation`` objects (``.forward``), and the
    comparison judges forward and gradient rows with one k (``comparison.parts``: "forward", "gradients").
    """
    from ..kernel.propagate import propagate
    from .backward import GradientSimulation
    from .simulate import Simulation, _check_int, _check_seed, simulate
    _check_int("seeds", seeds, 2)   # a standard error needs two seeds
    _check_seed(seed)
    _check_alpha(alpha)
    if sim_options.get("scores") == "standard":
        raise NotSupportedError("--scores standard changes only the simulation, so the theory would not match: "
                                "set scores = \"standard\" on the attention layers of the spec instead (the "
                                "engine then estimates that limit over random score draws), or use `simulate`")
    if gradients and sim_options.pop("products", "explicit") != "explicit":
        raise SpecError("products", "auto", "the gradient check backpropagates through explicit weight matrices: "
                        "leave products unset")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    theory = propagate(network, inputs, record=record, every=every, keep_kernels=True, spectral=spectral,
                       quad_nodes=quad_nodes)
    common = dict(record=record, every=every, spectral=spectral, dong=False, **sim_options)
    run: Callable[..., Simulation | GradientSimulation]   # simulate, or simulate_gradients with Π_L bound
    if gradients:
        from ..kernel.backward import backpropagate
        from .backward import simulate_gradients
        gtheory = backpropagate(network, inputs, output_grad=output_grad, rho=rho, every=every, keep_kernels=True,
                                quad_nodes=quad_nodes)
        gtheory = dataclasses.replace(gtheory, forward=theory)
        run = functools.partial(simulate_gradients, output_grad=output_grad, rho=rho)
    else:
        run = simulate
    _check_int("width", width, 1)
    half = None
    if extrapolate:   # the narrower run first: it is cheaper and its width is the binding constraint
        narrow = half_width(width, network)
        try:
            half = run(network, inputs, narrow, seeds, seed=np.random.SeedSequence([seed, 1]), **common)
        except SpecError as exc:
            if exc.field != "width" or narrow == width:
                raise
            raise SpecError("width", width, f"the bias correction also simulates width {narrow}, where: "
                            f"{exc.allowed} (raise --width, or use --no-extrapolate)") from None
    main = run(network, inputs, width, seeds, seed=np.random.SeedSequence([seed, 0]), progress=progress, **common)
    if not gradients:
        return compare(theory, main, half, alpha=alpha), theory, main, half
    assert isinstance(main, GradientSimulation) and (half is None or isinstance(half, GradientSimulation))
    fwd_raw = _forward_raw(theory, main.forward, None if half is None else half.forward, ATOL, RTOL)
    grad_raw, grad_labels = _gradient_raw(gtheory, main, half, ATOL, RTOL)
    fwd, grad = _judge([(fwd_raw, list(theory.labels)), (grad_raw, grad_labels)], main, half, alpha)
    return joint(fwd, grad), gtheory, main, half
