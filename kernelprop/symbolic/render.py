"""Text, LaTeX and numpy-code views of a :class:`~kernelprop.symbolic.derive.Derivation`."""

from __future__ import annotations

import sympy as sp

from . import symbols as S
from .blockmap import ExplicitCoder, lambdify
from .derive import Derivation

_PRIME = {"q": "q'", "rho": "ρ'", "mu": "μ'"}
_LATEX_PRIME = {"q": "q'", "rho": r"\rho'", "mu": r"\mu'"}
_display = S.display
text = S.text


def latex(e, names: dict | None = None) -> str:
    """``sympy.latex`` with Greek names for the state symbols and fields (``rho_0`` → ``\\rho_{0}``)."""
    table = {**_LATEX_NAMES, **S.LATEX, **(names or {})}
    sym_names = {}
    for s in sp.sympify(e).free_symbols:
        base, _, sub = s.name.rpartition("_")
        if s.name in table:
            sym_names[s] = table[s.name]
        elif base and sub.isdigit() and base in table:
            sym_names[s] = f"{table[base]}_{{{sub}}}"
    return sp.latex(e, symbol_names=sym_names)


_LATEX_NAMES = {"sigma_w2": r"\sigma_w^2", "sigma_b2": r"\sigma_b^2", "sigma_v2": r"\sigma_v^2",
                "sigma_o2": r"\sigma_o^2", "sigma_qk2": r"\sigma_{qk}^2", "epsilon": r"\epsilon",
                "alpha": r"\alpha", "beta": r"\beta", "gamma": r"\gamma"}


def _cse_lines(exprs, budget=90):
    """``(where, reduced)``: common subexpressions of long expressions (over ``budget`` characters), x₀, x₁, …"""
    from .blockmap import dag_nodes
    if len(dag_nodes(exprs)) < 4 * budget and max((len(text(e)) for e in exprs), default=0) <= budget:
        return [], list(exprs)
    where, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("x", real=True))
    return where, reduced


def _hyper_lines(d: Derivation) -> list:
    bm = d.map
    ns = bm.namespace
    net = bm.network
    parts = [f"L = {net.depth} (depth)", "l = block index"]
    if bm.mode == "equicorrelated":
        parts.append(f"T = {d.tokens} (tokens)" if d.tokens else "T = tokens")
    else:
        parts.append(f"sequences {list(bm.coder.fam.segments)}")
    lines = ["hyperparameters: " + ", ".join(parts)]
    if ns.params:
        lines.append("params: " + ", ".join(f"{text(sym)} = {text(ns.values[sym])}" for sym in ns.params.values()))
    for sym, (path, val) in ns.chosen.items():
        lines.append(f"symbol {text(sym)} = {path} = {text(val)}")
    return lines


def render_text(d: Derivation) -> str:
    """The block map, trajectory, C-map and fixed points as plain text (Unicode)."""
    bm = d.map
    out = []
    head = d.title or bm.network.name or "network"
    if isinstance(bm.coder, ExplicitCoder):
        out.append(f"{head} — explicit kernel of {bm.coder.n} tokens: Σ = (S_i_j), means m_i")
    else:
        out.append(f"{head} — equicorrelated state Σ = q[(1−ρ)I + ρ11ᵀ] on T tokens, per-token mean μ")
    out += _hyper_lines(d)
    names = bm.coder.names
    for section, title in (("stem", "stem (once, l = 0)"), ("block", "block l"), ("final", "final (once)")):
        sec = getattr(bm, section)
        if sec is None:
            continue
        out.append("")
        out.append(f"{title}, layer by layer (the symbols stand for that layer's input):")
        for st in sec.steps:
            first = True
            for n, e in zip(names, st.outputs):
                sym = sp.Symbol(n)
                if bm.mode == "explicit" and (e == _as_symbol(bm, n) or (n.startswith("m_") and e == 0)):
                    continue
                if bm.mode == "equicorrelated" and n == "mu" and e == 0 and not bm.state[-1] == S.mu:
                    continue
                out.append(f"  {st.label if first else '':14s}{_arrow(n)} {text(e)}")
                first = False
            if first:
                out.append(f"  {st.label:14s}(no change)")
        exprs = [e for n, e in zip(names, sec.outputs)]
        keep = [(n, e) for n, e in zip(names, exprs) if not (n in ("mu",) or n.startswith("m_")) or e != 0]
        where, reduced = _cse_lines([e for _, e in keep])
        out.append("  composed:" if len(sec.steps) > 1 else "  map:")
        for (n, _), e in zip(keep, reduced):
            out.append(f"    {_arrow(n)} {text(e)}")
        if where:
            out.append("    where")
        for sym, e in where:
            out.append(f"      {text(sym)} = {text(e)}")
        if section == "block" and bm.first is not None and bm.first is not bm.block:
            out.append("  (shown for l ≥ 2; block 1 starts from the input's zero mean, which gives the same values)")
    out.append("")
    out += _trajectory_lines(d, text)
    if d.c_map is not None:
        out.append("")
        out += _cmap_lines(d)
    if bm.mode == "equicorrelated":
        out.append("")
        out.append("fixed points (stability for the spec's values):")
        if not d.fixed_points:
            out.append("  none found")
        for fp in d.fixed_points:
            vals = ", ".join(f"{_display(k)}* = {text(v) if fp.exact else f'{v:.9g}'}" for k, v in fp.values.items())
            out.append(f"  {vals}  [{'exact' if fp.exact else 'numeric'}]  {fp.stability}: {fp.note}")
    else:
        out.append("")
        out.append("C-map and fixed points: available in the equicorrelated (q, ρ) mode")
    return "\n".join(out)


def _as_symbol(bm, n):
    for s in bm.coder.symbols:
        if str(s) == n:
            return s
    return None


def _arrow(n):
    return f"{_PRIME.get(n, _display(n) + chr(39))} ="


def _trajectory_lines(d, fmt):
    tr = d.trajectory
    lines = []
    if tr.found:
        lines.append(f"trajectory (closed form; {tr.method}):")
        for name, (step, sol, init) in tr.coordinates.items():
            lines.append(f"  {name}' = {fmt(step)}   ⇒   {name}_l = {fmt(sol)},   {name}₀ = {fmt(init)}")
        if tr.coordinates:
            lines.append("  in full:")
        for n, e in tr.solution.items():
            lines.append(f"  {_at_l(n)} = {fmt(e)}" + (f"   (l ≥ {tr.valid_from[n]})" if tr.valid_from.get(n) else ""))
    else:
        lines.append(f"trajectory: no closed form found ({tr.reason})")
        for n, e in tr.solution.items():
            lines.append(f"  but {_at_l(n)} = {fmt(e)}   (l ≥ {tr.valid_from.get(n, 0)})")
    return lines


def _at_l(n):
    return f"{_display(n)}_l" if n in ("q", "rho", "mu") else f"{n}(l)"


def _cmap_lines(d):
    cm = d.c_map
    lines = ["C-map on normalised inputs, C(c) = ρ'(q = 1, ρ = c, μ = 0)"
             + (" (ρ' does not depend on q)" if cm.q_free else " (ρ' depends on q: this is the map at q = 1)") + ":"]
    lines.append(f"  C(c) = {text(cm.c_map)}")
    lines.append(f"  C(0) = {text(cm.c0)},  C(1) = {text(cm.c1)}")
    chi_v = (f"  (= {cm.chi_value:.6g} for the spec's values)" if cm.chi_value is not None and not cm.chi.is_number
             else "")
    lines.append(f"  χ = C'(1) = {text(cm.chi)}{chi_v}")
    lam_v = f"  (= {cm.lambda_a_value:.6g})" if cm.lambda_a_value is not None and not cm.lambda_a.is_number else ""
    lines.append(f"  λ_a = ½ ln χ = {text(cm.lambda_a)}{lam_v}")
    if cm.asymptotic is not None:
        lines.append(f"  marginal (χ = 1): 1 − ρ_l ≈ {text(cm.asymptotic)} for large l")
    return lines


def render_latex(d: Derivation) -> str:
    """The same content as LaTeX (``align*`` environments)."""
    bm = d.map
    names = bm.coder.names
    tex = lambda e: latex(e, bm.namespace.latex)  # noqa: E731
    out = [f"% {d.title or bm.network.name} — kernelprop symbolic ({bm.mode})"]
    for section in ("stem", "block", "final"):
        sec = getattr(bm, section)
        if sec is None:
            continue
        out.append(f"% {section}: composed map")
        out.append(r"\begin{align*}")
        rows = []
        for n, e in zip(names, sec.outputs):
            if (n == "mu" or n.startswith("m_")) and e == 0:
                continue
            lhs = _LATEX_PRIME.get(n, tex(_as_symbol(bm, n)) + "'")
            rows.append(f"{lhs} &= {tex(e)}")
        out.append(" \\\\\n".join(rows))
        out.append(r"\end{align*}")
    tr = d.trajectory
    out.append("% trajectory: " + ("closed form" if tr.found else f"no closed form found ({tr.reason})"))
    if tr.solution:
        out.append(r"\begin{align*}")
        rows = [f"{tex(sp.Symbol(n))}_{{l}} &= {tex(e)}" for n, e in tr.solution.items()]
        out.append(" \\\\\n".join(rows))
        out.append(r"\end{align*}")
    cm = d.c_map
    if cm is not None:
        out.append("% C-map on normalised inputs and its slope at 1")
        out.append(r"\begin{align*}")
        rows = [f"C(c) &= {tex(cm.c_map)}", f"\\chi = C'(1) &= {tex(cm.chi)}",
                f"\\lambda_a = \\tfrac12 \\ln \\chi &= {tex(cm.lambda_a)}"]
        if cm.asymptotic is not None:
            rows.append(f"1 - \\rho_l &\\approx {tex(cm.asymptotic)}")
        out.append(" \\\\\n".join(rows))
        out.append(r"\end{align*}")
    return "\n".join(out)


def render_code(d: Derivation, section: str = "block") -> str:
    """The numpy source of the block map (``sympy.lambdify(..., cse=True)``), with its argument list."""
    bm = d.map
    fn, src = lambdify(bm, section, substitute_fields=False)
    args = [str(a) for a in list(bm.state) + bm.hyper]
    outs = list(bm.coder.names)
    head = [f"# {d.title or bm.network.name}: {section} map of kernelprop's symbolic engine ({bm.mode} mode)",
            f"# arguments: {', '.join(args)}",
            f"# returns:   [{', '.join(outs)}] (new state after one {section})"]
    return "\n".join(head) + "\n" + src
