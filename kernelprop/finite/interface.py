"""One entry point for finite width and finite heads: the limit and the finite prediction side by side.

``kp.propagate(network, inputs, width=d, heads=H, samples=n)`` (and ``kernelprop run --width D
[--heads H] [--samples N]``) return a :class:`FinitePrediction`: the infinite-width, many-heads limit
(today's :func:`kernelprop.propagate`), the finite prediction's per-record mean, standard deviation and
quantiles of every measure, and its bias ``finite mean − limit`` with a standard error. Methods:

* ``"chain"`` — finite heads, infinite width (:mod:`.chain`): width omitted, ``heads`` given;
* ``"gram"`` — finite width (:mod:`.gram`, exact in law, finite heads included): ``width`` given;
* ``"sde"`` — the proportional depth-width limit, dispatched to ``kernelprop.finite.sde`` when present.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NotSupportedError, SpecError
from ..inputs import Inputs
from ..network.network import Network
from . import chain, gram

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
METHODS = ("chain", "gram", "sde")


@dataclass(frozen=True, eq=False)
class FinitePrediction:
    """The limit and the finite-width / finite-heads prediction at the same records.

    ``limit``: the :class:`~kernelprop.kernel.propagate.Trajectory` of the wide, many-heads limit;
    ``finite``: the samples (:class:`~kernelprop.montecarlo.simulate.Simulation`, ``samples[name]`` of shape
    (n, R[, T₀])); ``method`` ``"chain"`` | ``"gram"`` | ``"sde"``. Per measure: :meth:`mean`, :meth:`sd`,
    :meth:`stderr`, :meth:`quantiles`, :meth:`bias` (finite mean − limit) and :meth:`bias_se`."""

    limit: Any
    finite: Any
    method: str
    width: int | None
    heads: int | None
    samples: int
    quantile_levels: tuple = QUANTILES
    meta: dict = field(default_factory=dict)

    @property
    def labels(self) -> list:
        return list(self.limit.labels)

    @property
    def measures(self) -> list:
        return [k for k in self.finite.samples if k in self.limit.measures]

    def mean(self, name: str) -> np.ndarray:
        return self.finite.samples[name].mean(axis=0)

    def sd(self, name: str) -> np.ndarray:
        return self.finite.samples[name].std(axis=0, ddof=1)

    def stderr(self, name: str) -> np.ndarray:
        return self.sd(name) / np.sqrt(self.samples)

    def quantiles(self, name: str) -> np.ndarray:
        """(len(quantile_levels), R[, T₀]) sample quantiles."""
        return np.quantile(self.finite.samples[name], self.quantile_levels, axis=0)

    def bias(self, name: str) -> np.ndarray:
        """Finite mean − limit: the O(1/width) (or O(1/heads)) shift the limit alone misses."""
        return self.mean(name) - self.limit.measures[name]

    def bias_se(self, name: str) -> np.ndarray:
        """Standard error of :meth:`bias`: the sampling error of the finite mean combined with the limit's own
        error estimate (``quad_error``, non-zero for random standard scores) where the measure is the kernel's
        scale (applied to every measure as an allowance)."""
        se = self.stderr(name)
        q = np.array(self.limit.measures.get("quad_error", np.zeros(len(self.labels))), dtype=np.float64)
        q = q.reshape(q.shape + (1,) * (se.ndim - 1))
        return np.sqrt(se ** 2 + q ** 2)

    def summary(self) -> dict:
        """``{measure: {"limit", "mean", "sd", "se", "quantiles", "bias", "bias_se"}}`` (arrays over records)."""
        return {k: dict(limit=np.asarray(self.limit.measures[k]), mean=self.mean(k), sd=self.sd(k),
                        se=self.stderr(k), quantiles=self.quantiles(k), bias=self.bias(k), bias_se=self.bias_se(k))
                for k in self.measures}

    def title(self) -> str:
        what = f"width {self.width}" if self.width else "infinite width"
        heads = f", {self.heads} heads" if self.heads else ""
        return f"finite prediction ({self.method}, {what}{heads}, {self.samples} samples) beside the limit"

    def _rows(self, most: int) -> list:
        from ..report import pick_rows
        return pick_rows(len(self.labels), most)

    def table(self, measures=("q_mean", "cos_mean"), most: int = 24) -> str:
        """A plain-text table: per record and measure the limit, finite mean ± se, s.d., bias ± se (five
        significant digits, scientific notation where a fixed point would lose them)."""
        from ..report import num
        lines = [self.title()]
        lines.append(f"{'record':<14}" + "".join(
            f"{m + ' limit':>18}{'finite mean ± se':>24}{'sd':>10}{'bias ± se':>24}" for m in measures))
        for r in self._rows(most):
            cells = []
            for m in measures:
                lim, mu, se = self.limit.measures[m][r], self.mean(m)[r], self.stderr(m)[r]
                b, bse = self.bias(m)[r], self.bias_se(m)[r]
                cells.append(f"{num(lim, 7):>18}{num(mu, 7) + ' ± ' + num(se, 2):>24}{num(self.sd(m)[r], 3):>10}"
                             f"{num(b, 3) + ' ± ' + num(bse, 2):>24}")
            lines.append(f"{self.labels[r]:<14}" + "".join(cells))
        return "\n".join(lines)

    def tables(self, measures=("q_mean", "cos_mean"), most: int = 24, width: int | None = None) -> list:
        """One rich table per measure (record, limit, finite mean ± se, s.d., bias ± se), fitted to ``width``
        like the other summaries (:func:`kernelprop.report.fit`: fewer digits or a tighter layout, never a cut
        cell)."""
        from rich.table import Table

        from ..report import fit, num, safe
        rows = self._rows(most)
        out = []
        for m in measures:
            def build(digits, m=m):
                t = Table(title=safe(f"{m}: {self.title()}"), header_style="bold")
                t.add_column("record")
                for c in ("limit", "finite mean ± se", "s.d.", "bias ± se"):
                    t.add_column(c, justify="right", no_wrap=True)
                for r in rows:
                    se, b, bse = self.stderr(m)[r], self.bias(m)[r], self.bias_se(m)[r]
                    t.add_row(safe(self.labels[r]), num(self.limit.measures[m][r], digits + 2),
                              f"{num(self.mean(m)[r], digits + 2)} ± {num(se, 2)}", num(self.sd(m)[r], digits - 2),
                              f"{num(b, digits - 2)} ± {num(bse, 2)}")
                return t
            out.append(fit(build, width))
        return out


def check(network: Network, inputs: Inputs, width, heads, samples, method) -> str:
    """Every option checked before any work; returns the method."""
    chain.check_heads(heads)
    if width is None and heads is None:
        raise SpecError("width", None, "give width= (finite width) and/or heads= (finite heads)")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise SpecError("samples", samples, "must be a whole number >= 2 (a standard deviation needs two)")
    if method is not None and method not in METHODS:
        raise SpecError("method", method, f"must be one of {list(METHODS)} or omitted")
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise SpecError("width", width, "must be a whole number >= 1")
        if heads is not None and width % heads:
            raise SpecError("heads", heads, f"must divide the width {width} (each head takes width/heads features)")
        gram.check(inputs, width, samples)
    if method is None:
        method = "gram" if width is not None else "chain"
    if method == "chain" and width is not None:
        raise SpecError("method", method, "the chain is the infinite-width model: omit width, or use method "
                        "\"gram\"")
    if method == "gram" and width is None:
        raise SpecError("width", None, "the Gram sampler needs a finite width")
    return method


def predict(network: Network, inputs: Inputs, *, width: int | None = None, heads: int | None = None,
            samples: int = 256, seed: int = 0, method: str | None = None, record: str = "blocks", every: int = 1,
            spectral: bool | str = "auto", quad_nodes: int | None = None) -> FinitePrediction:
    """The limit and the finite-width / finite-heads prediction (see the module docstring)."""
    from ..kernel.propagate import propagate
    chosen = method is None
    method = check(network, inputs, width, heads, samples, method)
    if chosen and method == "gram":
        method = _gram_or_sde(network if heads is None else _with_heads(network, heads), inputs, width)
    if record != "blocks":
        raise SpecError("record", record, "the finite prediction is recorded at whole blocks: use \"blocks\"")
    net = network
    if heads is not None:
        net = _with_heads(network, heads)
    limit = propagate(net, inputs, record="blocks", every=every, spectral=spectral, quad_nodes=quad_nodes)
    if method == "chain":
        fin = chain.run(net, inputs, heads, samples, seed=seed, every=every, spectral=spectral)
    elif method == "gram":
        assert width is not None
        fin = gram.sample(net, inputs, width, samples, seed=seed, every=every, spectral=spectral)
    else:   # dispatch point of the proportional depth-width limit
        try:
            sde = importlib.import_module(f"{__package__}.sde")
        except ImportError:
            raise NotSupportedError("method \"sde\" (the proportional depth-width limit) is not available in this "
                                    "version: use method \"gram\" at the width you want") from None
        fin = sde.run(net, inputs, width=width, heads=heads, samples=samples, seed=seed, every=every,
                      spectral=spectral)
    return FinitePrediction(limit=limit, finite=fin, method=method, width=width, heads=heads, samples=samples,
                            meta=dict(seed=seed))


def _gram_or_sde(network: Network, inputs: Inputs, width) -> str:
    """``"gram"`` when the Gram sampler has a rule for every layer; else ``"sde"`` when the network is one the
    covariance SDE describes (:func:`kernelprop.finite.sde.model_of`); else the Gram sampler's refusal."""
    try:
        gram.check_network(network, width)
    except NotSupportedError as refusal:
        from . import sde
        try:
            sde.model_of(network, width)
        except SpecError:
            raise refusal from None
        return "sde"
    return "gram"


def _with_heads(network: Network, heads: int) -> Network:
    """The network with every attention layer's head count set to ``heads`` (stem, blocks, final)."""
    return network._replace(**{part: chain.with_heads(getattr(network, part), heads, False)
                               for part in ("block", "stem", "final")})
