"""Exact finite-width sampler in Gram space (docs/finite-width.md, "The Gram sampler").

The d-wide features are never formed except where a coordinate-wise map needs them. The state is a
stack of *spaces*; each holds named blocks of rows (the stream ``x`` of N tokens, the all-ones row
``one``, the skips of open residual branches) as a factor ``F`` (rows × r, r ≤ width) with
``F Fᵀ = X̃ X̃ᵀ / w``: the rows are ``X̃ = √w F Vᵀ`` for an orthonormal frame V (w × r) that is
independent of every weight not yet drawn. The measured kernel is ``F_x F_xᵀ`` and the token means
``F_x f_oneᵀ`` (docs/theory.md §0).

Rules (each exact in law, derivations in docs/finite-width.md):

* Dense ``Y = X W + 1bᵀ``, ``W ~ N(0, σ²/d_in)``, ``b ~ N(0, σ_b²)``: with ``P = [σ F_x, σ_b 1]``,
  ``Y = P G`` for a standard normal ``G`` (p × d_out). Expressed in the frame ``V`` of the r rows already
  kept at width d_out (skip, ones): ``G [V, V⊥] = [G₁, G₂]`` with G₁ (p × r) and G₂ independent standard
  normal, and ``G₂ G₂ᵀ ~ Wishart_p(d_out − r, I)`` is drawn by Bartlett's decomposition
  (``A`` lower triangular, ``A_ii² ~ χ²_{d_out−r−i}``, ``A_ij ~ N(0, 1)``; a plain p × (d_out − r) normal
  matrix when ``d_out − r < p``, the rank-deficient case). The output rows are ``P [G₁, A] / √d_out`` in the
  frame ``[V, new]``. Cost O(p² r + N p²), not O(N d²).
* Activation: needs the coordinates: a Dense layer just before it is drawn as ``Y = P G`` in full (d·N·p),
  φ applied, and the rows ``[φ(Y); 1ᵀ]/√d`` reduced to a factor by QR (d·N²).
* LayerNorm / RMSNorm / Scale: row operations in the frame (centring subtracts ``m_i f_one``).
* Residual ``α x + β f(x)``: the skip is kept as a block of the same space; the branch's last weight
  matrix writes its output into that space's frame, so the cross Gram is exact.
* Attention: per head ``Q_h = √σ_qk F_x G_q``, ``K_h = F_x G_k`` (G r × d_k standard: the d_k-wide queries
  and keys given the Gram), scores ``Q_h K_hᵀ/√d_k`` (standard) or ``Q_h Q_hᵀ/d_k`` (tied), the layer's
  masks and biases, softmax and matrix modification ``M_h``; the head-concatenated values
  ``O = [M_h P_v G_{v,h}]_h`` enter the output projection through their Gram only, so each head's
  ``G_{v,h} G_{v,h}ᵀ ~ Wishart(d/H)`` is drawn by Bartlett.

Anything else (dropout, parallel branches, gated MLPs, RoPE, QK-norm, weight-free or ``"unit"``-scaled
layers, orthogonal weights, Gaussian inputs) is refused by name: :func:`kernelprop.montecarlo.simulate`
is the fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import measures as M
from ..errors import NotSupportedError, NumericalError, SpecError
from ..inputs import Inputs
from ..layers.activation import Activation
from ..layers.attention import Attention
from ..layers.attention import matrices as MX
from ..layers.base import resolved
from ..layers.composite import Residual, Serial
from ..layers.dense import Dense
from ..layers.norm import LayerNorm, RMSNorm
from ..layers.scale import Scale
from ..montecarlo import sampler as S
from ..montecarlo.simulate import Simulation, _Accumulator, _finish
from ..network.network import Network
from ..network.walk import RecordPlan, units

FALLBACK = "use kernelprop.montecarlo.simulate (the full finite-width simulator) for this network"


# ----------------------------------------------------------------------------------------------
# random matrices


def wishart_factor(rng: np.random.Generator, batch: int, p: int, dof: int) -> np.ndarray:
    """``(B, p, k)``, k = min(p, dof), with ``A Aᵀ ~ Wishart_p(dof, I)``.

    Bartlett (1933): for dof ≥ p, A lower triangular with ``A_ii = sqrt(χ²_{dof−i})`` (i = 0…p−1) and
    ``A_ij ~ N(0, 1)`` below the diagonal; for dof < p (singular Wishart) a p × dof standard normal matrix."""
    if dof <= 0:
        return np.zeros((batch, p, 0))
    if dof < p:
        return rng.standard_normal((batch, p, dof))
    a = np.tril(rng.standard_normal((batch, p, p)), -1)
    idx = np.arange(p)
    a[:, idx, idx] = np.sqrt(rng.chisquare(dof - idx, size=(batch, p)))
    return a


def _compress(f: np.ndarray) -> np.ndarray:
    """A factor with the same Gram ``F Fᵀ`` and at most ``rows`` columns (R of the QR of Fᵀ, transposed):
    a rotation of the frame, which no later rule can see."""
    rows, cols = f.shape[-2:]
    if cols <= rows:
        return f
    r = np.linalg.qr(np.swapaxes(f, -1, -2), mode="r")           # (B, rows, rows)
    return np.swapaxes(r, -1, -2)


# ----------------------------------------------------------------------------------------------
# state


@dataclass
class Space:
    """Rows of one width-w feature space in a common frame: ``blocks[name] = (B, n, r)`` factors."""

    width: int
    blocks: dict = field(default_factory=dict)
    coords: np.ndarray | None = None    # (B, N, w): the stream's actual coordinates when just materialised

    @property
    def rank(self) -> int:
        return next(iter(self.blocks.values())).shape[-1]

    def stacked(self):
        names = list(self.blocks)
        return names, np.concatenate([self.blocks[k] for k in names], axis=1)

    def set_stacked(self, names, f):
        start = 0
        for k in names:
            n = self.blocks[k].shape[1]
            self.blocks[k] = f[:, start:start + n]
            start += n

    def compress(self):
        names, f = self.stacked()
        self.set_stacked(names, _compress(f))

    def pad(self, cols: int):
        """Append ``cols`` zero columns (new frame directions, orthogonal to the kept rows)."""
        if cols:
            for k, v in self.blocks.items():
                self.blocks[k] = np.concatenate([v, np.zeros(v.shape[:2] + (cols,))], axis=2)


@dataclass
class Pending:
    """A weight matrix's output not drawn yet: the actual rows are ``P G`` with G (p × width) standard normal."""

    p: np.ndarray     # (B, N, p)
    width: int
    where: str


class _Run:
    def __init__(self, rng, batch, segments, width, where="?"):
        self.rng, self.batch, self.segments, self.where = rng, batch, tuple(segments), where
        self.width = width      # the model width d (Dense output widths are multiples of it)
        self.stack: list[Space] = []
        self.pending: Pending | None = None
        self.skips = 0
        self.cache: dict = {}

    # --- stream access --------------------------------------------------------------------------

    @property
    def top(self) -> Space:
        return self.stack[-1]

    def stream(self) -> np.ndarray:
        """The stream's normalised factor F_x (resolving a pending weight matrix into its frame)."""
        self.resolve()
        return self.top.blocks["x"]

    def resolve(self, coords: bool = False):
        """Draw a pending weight matrix's output: into the frame of the innermost space of its width
        (joint with the skips kept there), or, with ``coords``, in full coordinates in a fresh space."""
        pend = self.pending
        if pend is None:
            return
        self.pending = None
        b, n, p = pend.p.shape
        w = pend.width
        if coords:
            y = np.matmul(pend.p, self.rng.standard_normal((b, p, w)))            # (B, N, w): Y = P G
            self.stack.append(_space_from_coords(y))
            return
        target = next((s for s in reversed(self.stack) if s.width == w), None)
        if target is None:
            target = Space(w, {"one": np.ones((b, 1, 1))})
            self.stack.append(target)
        else:   # the stack above the target only held the consumed input: drop it
            while self.stack[-1] is not target:
                self.stack.pop()
        r = target.rank
        g1 = self.rng.standard_normal((b, p, r))
        a = wishart_factor(self.rng, b, p, w - r)
        target.pad(a.shape[-1])
        target.blocks["x"] = np.matmul(pend.p, np.concatenate([g1, a], axis=2)) / math.sqrt(w)
        target.coords = None
        target.compress()

    def set_stream(self, fx: np.ndarray):
        self.top.blocks["x"] = fx
        self.top.coords = None

    def consume(self) -> np.ndarray:
        """Take the stream's factor out of its space (an input to a weight matrix); a space left with only
        the ones row is dropped."""
        fx = self.stream()
        sp = self.top
        del sp.blocks["x"]
        if set(sp.blocks) == {"one"}:
            self.stack.pop()
        return _compress(fx)     # the stream's own frame (≤ N columns): a weight matrix sees only its rows


def _space_from_coords(y: np.ndarray) -> Space:
    """A space from actual coordinates (B, N, w): a factor of the Gram of ``[Y; 1ᵀ]/√w`` (cost w·N² for the
    Gram, N³ for its eigen-factor; at most min(N + 1, w) columns)."""
    b, n, w = y.shape
    rows = np.concatenate([y, np.ones((b, 1, w))], axis=1)
    gram = np.matmul(rows, np.swapaxes(rows, -1, -2)) / w
    return Space(w, _split(_factor(gram, w), n), coords=y)


def _factor(gram: np.ndarray, cols: int) -> np.ndarray:
    """``F`` with ``F Fᵀ = gram`` (B, R, R) from its eigen-decomposition, keeping the top ``min(R, cols)``
    directions (a Gram of vectors of width ``cols`` has at most that rank; the rest is rounding)."""
    lam, vec = np.linalg.eigh(gram)
    keep = min(gram.shape[-1], cols)
    lam, vec = lam[..., -keep:], vec[..., -keep:]
    return vec * np.sqrt(np.clip(lam, 0.0, None))[..., None, :]


def _split(f: np.ndarray, n: int) -> dict:
    return {"x": f[:, :n], "one": f[:, n:]}


# ----------------------------------------------------------------------------------------------
# layer rules


def _dense_input(fx, var, bias_var):
    """``P = [σ F_x, σ_b 1]``: the rows whose product with a standard normal G is ``X W + 1bᵀ``."""
    p = math.sqrt(float(var)) * fx
    if bias_var:
        p = np.concatenate([p, np.full(fx.shape[:2] + (1,), math.sqrt(float(bias_var)))], axis=2)
    return p


def _dense(layer: Dense, run: _Run):
    fx = run.consume()
    run.pending = Pending(_dense_input(fx, layer.weight_var, layer.bias_var), layer.out_width(run.width), run.where)


def _activation(layer: Activation, run: _Run):
    if run.pending is not None:
        run.resolve(coords=True)
    sp = run.top
    if sp.coords is None:
        raise NotSupportedError(f"{run.where}: activation {layer.label!r} acts coordinate by coordinate, and the Gram "
                                "sampler has the coordinates only right after a Dense layer or another activation; "
                                f"{FALLBACK}")
    y, _ = layer.sample(sp.coords, S.Context([], sp.width, run.segments))
    run.stack[-1] = _space_from_coords(y)      # a materialised space holds only the stream and the ones row


def _norm(layer, run: _Run):
    fx = run.stream()
    one = run.top.blocks["one"]
    if isinstance(layer, LayerNorm) and layer.centring:
        mean = np.matmul(fx, np.swapaxes(one, -1, -2))              # (B, N, 1) = F_x f_oneᵀ
        fx = fx - mean * one
    var = np.einsum("bnk,bnk->bn", fx, fx)[..., None] + layer.eps
    if not np.all(var > 0):
        raise NumericalError(run.where, f"a token has zero variance entering {layer.kind}",
                             f"set {layer.kind}.eps > 0, or fix the collapse upstream")
    run.set_stream(fx * (layer.gain / np.sqrt(var)))


def _residual(layer: Residual, run: _Run):
    fx = run.stream()
    sp = run.top
    key = f"skip{run.skips}"
    run.skips += 1
    sp.blocks[key] = fx
    sp.coords = None        # the skip has no coordinates: no activation may act on this space in place
    where = run.where
    _apply(layer.branch, run, f"{where}/0:{layer.branch.kind}")
    run.where = where
    run.resolve()
    run.skips -= 1
    if run.top is not sp or "x" not in sp.blocks:
        raise NotSupportedError(f"{where}: the residual branch does not end in a weight matrix (Dense or attention's "
                                "output projection), so its output's coordinates relative to the skip are not "
                                f"determined by the Gram; {FALLBACK}")
    skip = sp.blocks.pop(key)
    sp.blocks["x"] = layer.alpha * skip + layer.beta * sp.blocks["x"]
    sp.compress()


def _attention(layer: Attention, run: _Run):
    width = run.top.width if run.pending is None else run.pending.width
    h = layer.heads
    fx = run.consume()
    rng, b = run.rng, run.batch
    n, r = fx.shape[1:]
    mode = layer.score_mode(None)
    dk = layer.key_dim(width)
    dv = width // h
    mixes = np.zeros((b, h, n, n))
    start = 0
    scores = None
    if layer.beta != 0 and mode != "uniform":
        gq = rng.standard_normal((b, h, r, dk))
        q = math.sqrt(resolved(layer.qk_var)) * np.matmul(fx[:, None], gq)              # (B, H, N, d_k)
        if mode == "tied":
            scores = np.matmul(q, np.swapaxes(q, -1, -2)) / dk
        else:
            k = np.matmul(fx[:, None], rng.standard_normal((b, h, r, dk)))
            scores = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(dk)
    for t in run.segments:
        sl = slice(start, start + t)
        start += t
        key = ("offsets", id(layer), t)
        offsets = run.cache.get(key)
        if offsets is None:
            offsets = run.cache[key] = MX.logit_offsets(layer, t, run.where)          # (H, t, t)
        c = None
        if mode == "uniform" or layer.matrix == "shaped":
            ckey = ("zero", id(layer), t)
            c = run.cache.get(ckey)
            if c is None:
                c = run.cache[ckey] = MX.softmax(offsets.copy())
        m = np.zeros((b, h, t, t)) if layer.matrix == "softmax" else np.broadcast_to(
            resolved(layer.alpha) * np.eye(t), (b, h, t, t)).copy()
        if layer.beta != 0:
            if mode == "uniform":
                assert c is not None
                a = np.broadcast_to(c, (b, h, t, t))
            else:
                assert scores is not None
                a = MX.softmax(scores[:, :, sl, sl] + offsets)
            m += resolved(layer.beta) * a
        if layer.matrix == "shaped" and layer.gamma != 0:
            assert c is not None
            m -= resolved(layer.gamma) * c
        mixes[:, :, sl, sl] = m
    pv = _dense_input(fx, layer.value_var, layer.value_bias_var)                 # (B, N, p)
    p = pv.shape[-1]
    heads = []
    for hh in range(h):
        bart = wishart_factor(rng, b, p, dv)                                      # G_v,h G_v,hᵀ = A Aᵀ
        heads.append(np.matmul(mixes[:, hh], np.matmul(pv, bart)))
    fo = _compress(np.concatenate(heads, axis=2) / math.sqrt(width))             # normalised rows of O
    run.pending = Pending(_dense_input(fo, layer.out_var, layer.out_bias_var), width, run.where)


def _check_layer(layer, where: str, width: int, model: int) -> int:
    """Refuse, before any draw, a layer the Gram sampler has no rule for (by name) and head counts that do not
    divide the stream width (SpecError naming ``heads``); returns the output width."""
    if isinstance(layer, Serial):
        for i, child in enumerate(layer.layers):
            width = _check_layer(child, f"{where}/{i}:{child.kind}", width, model)
        return width
    if isinstance(layer, Residual):
        out = _check_layer(layer.branch, f"{where}/0:{layer.branch.kind}", width, model)
        if out != width:
            raise SpecError(f"{where}.width", out, f"the residual branch must return the stream width {width}")
        return width
    if isinstance(layer, Dense):
        if layer.is_unit("weight_var") or layer.init != "gaussian":
            what = "weight_var = \"unit\"" if layer.is_unit("weight_var") else f"init = \"{layer.init}\""
            raise NotSupportedError(f"{where}: the Gram sampler has no rule for a Dense layer with {what} (Gaussian "
                                    f"weights of a fixed variance only); {FALLBACK}")
        return layer.out_width(model)
    if isinstance(layer, Attention):
        bad = [(layer.rope_theta is not None, "RoPE"), (layer.qk_norm != "none", "QK-norm"),
               (layer.spa != "none", "SPA"), (layer.attention != "softmax", "identity attention"),
               (layer.values != "dense" or layer.projection != "dense", "weight-free values or projection"),
               (layer.is_unit("out_var"), "out_var = \"unit\"")]
        for flag, what in bad:
            if flag:
                raise NotSupportedError(f"{where}: the Gram sampler has no rule for attention with {what}; {FALLBACK}")
        if width % layer.heads:
            raise SpecError("heads", layer.heads, f"must divide the width {width} (each head takes width/heads "
                            f"features; at {where})")
        return width
    if isinstance(layer, (Activation, LayerNorm, RMSNorm, Scale)):
        return width
    raise NotSupportedError(f"{where}: the Gram sampler has no rule for layer `{layer.kind}`; {FALLBACK}")


def _apply(layer, run: _Run, where: str):
    run.where = where
    if isinstance(layer, Serial):
        for i, child in enumerate(layer.layers):
            _apply(child, run, f"{where}/{i}:{child.kind}")
        run.where = where
    elif isinstance(layer, Residual):
        _residual(layer, run)
    elif isinstance(layer, Dense):
        _dense(layer, run)
    elif isinstance(layer, Activation):
        _activation(layer, run)
    elif isinstance(layer, (LayerNorm, RMSNorm)):
        _norm(layer, run)
    elif isinstance(layer, Scale):
        run.set_stream(resolved(layer.c) * run.stream())
    elif isinstance(layer, Attention):
        _attention(layer, run)
    else:
        raise NotSupportedError(f"{where}: the Gram sampler has no rule for layer `{layer.kind}`; {FALLBACK}")


# ----------------------------------------------------------------------------------------------
# entry point


def check_network(network: Network, width: int) -> None:
    """NotSupportedError naming the first layer the Gram sampler has no rule for (before any draw)."""
    if getattr(network, "shared_weights", False):
        raise NotSupportedError(f"the Gram sampler draws fresh weights per layer: shared_weights = true; {FALLBACK}")
    w = width
    for unit in units(network):
        for i, part in enumerate(unit.parts):
            w = _check_layer(part, unit.part_label(i), w, width)


def check(inputs: Inputs, width, samples) -> None:
    """Bad input named: width ≥ 1, samples ≥ 2 (a spread needs two)."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise SpecError("width", width, "must be a whole number >= 1")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise SpecError("samples", samples, "must be a whole number >= 2 (a standard deviation needs two)")
    n = inputs.n_tokens
    if width < n + 1:
        raise SpecError("width", width, f"the input rows (N = {n} tokens and the mean direction) need width >= "
                        f"N + 1 = {n + 1} to be realised exactly (narrower widths make the Gram rank-deficient, which "
                        "the sampler itself handles, but the input kernel could not be the given one)")


def _input_space(inputs: Inputs, width: int, batch: int) -> Space:
    """The input rows exactly as :func:`~kernelprop.montecarlo.sampler.sample_inputs` ("exact"): Gram
    ``[[Σ⁰, m], [mᵀ, 1]]`` of ``[X; 1ᵀ]/√d``."""
    n = inputs.n_tokens
    g = np.empty((n + 1, n + 1))
    g[:n, :n], g[:n, n], g[n, :n], g[n, n] = inputs.sigma, inputs.mean, inputs.mean, 1.0
    lam, vec = np.linalg.eigh(g)
    if lam[0] < -1e-10 * max(lam[-1], 1e-300):
        raise SpecError("input.mean", "means larger than the token norms",
                        "Σ⁰ − m mᵀ must be positive semi-definite (a token's squared mean cannot exceed Σ⁰_ii)")
    f = vec * np.sqrt(np.clip(lam, 0.0, None))
    f = np.broadcast_to(f, (batch,) + f.shape).copy()
    return Space(width, {"x": f[:, :n], "one": f[:, n:]})


def sample(network: Network, inputs: Inputs, width: int, samples: int = 256, *, seed: int = 0,
           batch: int | None = None, every: int = 1, spectral: bool | str = "auto") -> Simulation:
    """``samples`` independent networks of width ``width`` drawn in Gram space, measured at the engine's
    block records; the same result type as :func:`kernelprop.montecarlo.simulate` (``dong_residual``,
    which needs the coordinates, is not computed). Bad input: :func:`check`; unsupported layers are refused
    by name before any draw."""
    check(inputs, width, samples)
    check_network(network, width)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError("seed", seed, "must be a whole number >= 0")
    if spectral == "auto":
        spectral = max(inputs.segments) <= 512
    n = inputs.n_tokens
    plan = RecordPlan(network, "blocks", every)
    labels = plan.all(network)
    if batch is None:
        batch = max(1, min(samples, 64))
    acc = _Accumulator(len(labels), n, True)
    rows_per_record: list[list[dict]] = [[] for _ in labels]
    ss = np.random.SeedSequence(int(seed))
    starts = list(range(0, samples, batch))
    for s0, child in zip(starts, ss.spawn(len(starts))):
        bsz = min(batch, samples - s0)
        rng = np.random.Generator(np.random.PCG64(child))
        run = _Run(rng, bsz, inputs.segments, width)
        run.stack.append(_input_space(inputs, width, bsz))
        r = 0

        def keep(label, run=run, bsz=bsz):
            nonlocal r
            if run.pending is not None:      # at a block record no residual is open: draw the coordinates
                run.resolve(coords=True)
            fx = run.stream()
            kern = np.matmul(fx, np.swapaxes(fx, -1, -2))
            if not np.all(np.isfinite(kern)):
                raise NumericalError(label, "the sampled Gram has NaN or infinite entries",
                                     "lower weight_var / branch weights, add a normalisation layer, "
                                     "or reduce the depth")
            mean = np.matmul(fx, np.swapaxes(run.top.blocks["one"], -1, -2))[..., 0]
            acc.add(r, kern, mean)
            rows_per_record[r].extend(M.compute(kern[i], inputs.segments, mean[i], spectral=spectral)
                                      for i in range(bsz))
            r += 1

        keep("input")
        for unit in units(network):
            for i, part in enumerate(unit.parts):
                _apply(part, run, unit.part_label(i))
                if plan.after(unit, i) is not None:
                    keep(unit.part_label(i))
    return _finish(network, inputs, width, samples, labels, acc, rows_per_record,
                   dict(width=width, seeds=samples, method="gram", seed=seed, batch=batch, every=every))
