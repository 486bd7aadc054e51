"""Input token kernels: what enters the first layer.

An :class:`Inputs` is the second-moment matrix ``Σ⁰ = X Xᵀ/d`` of all tokens (several sequences
stacked, in order), the per-token feature mean (zero unless given) and the sequence lengths.
Attention mixes tokens only within their own sequence; the kernel between sequences is the
NNGP cross-kernel (docs/theory.md §0). Inputs are treated as a zero-mean Gaussian stream, as after a
random embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SpecError


def segment_slices(segments):
    """The slice of each sequence in the stacked token axis."""
    start = 0
    for t in segments:
        yield slice(start, start + t)
        start += t


@dataclass(frozen=True, eq=False)
class Inputs:
    """A checked input kernel. Build one with the constructors below."""

    sigma: np.ndarray
    segments: tuple
    mean: np.ndarray = None  # type: ignore[assignment]  # None: zero mean; always an array after __post_init__
    description: str = ""
    token_ids: tuple[tuple[int, ...], ...] | None = field(default=None)

    def __post_init__(self):
        s = np.array(self.sigma, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
            raise SpecError("input.gram", f"array of shape {s.shape}", "must be a non-empty square N×N matrix")
        if not np.all(np.isfinite(s)):
            raise SpecError("input.gram", "matrix with NaN or inf", "must have finite entries")
        if not np.allclose(s, s.T, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(s).max())):
            raise SpecError("input.gram", "non-symmetric matrix", "must be symmetric")
        s = (s + s.T) / 2
        ev = np.linalg.eigvalsh(s)
        if ev[0] < -1e-10 * max(ev[-1], 1e-300):
            raise SpecError("input.gram", f"matrix with smallest eigenvalue {ev[0]:.3g}",
                            "must be positive semi-definite (a Gram matrix X Xᵀ/d)")
        if np.any(np.diag(s) <= 0):
            raise SpecError("input.gram", "matrix with a zero diagonal entry",
                            "every token needs a positive squared norm")
        segs = tuple(int(t) for t in self.segments)
        if any(t < 1 for t in segs) or sum(segs) != s.shape[0]:
            raise SpecError("input.sequences", list(segs), f"lengths must be >= 1 and add up to N = {s.shape[0]}")
        m = np.zeros(s.shape[0]) if self.mean is None else np.asarray(self.mean, dtype=np.float64)
        if m.shape != (s.shape[0],) or not np.all(np.isfinite(m)):
            raise SpecError("input.mean", f"array of shape {m.shape}", f"must be N = {s.shape[0]} finite numbers")
        object.__setattr__(self, "sigma", s)
        object.__setattr__(self, "segments", segs)
        object.__setattr__(self, "mean", m)

    @property
    def n_tokens(self) -> int:
        return self.sigma.shape[0]

    def with_positional(self, kind: str = "random", var: float = 1.0, dim: int = 512) -> Inputs:
        """Add positional embeddings ``Σ⁰ += σ_pe² R`` within each sequence.

        ``random``: learned positions at init, i.i.d. Gaussian, ``R = I``;
        ``sinusoidal``: Vaswani et al. 2017 with model width ``dim``,
        ``R_ij = (2/dim) Σ_{k<dim/2} cos(ω_k (i − j))``, ``ω_k = 10000^{−2k/dim}``.
        """
        if not (np.isfinite(var) and var >= 0):
            raise SpecError("input.positional_var", var, "must be a finite number >= 0")
        # position p of every sequence gets the same embedding vector
        pos = np.concatenate([np.arange(t) for t in self.segments])
        delta = pos[:, None] - pos[None, :]
        if kind == "random":
            r = (delta == 0).astype(float)
        elif kind == "sinusoidal":
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
                raise SpecError("input.positional_dim", dim, "must be an even whole number >= 2")
            omega = 10000.0 ** (-2 * np.arange(dim // 2) / dim)
            r = (2.0 / dim) * np.cos(delta[..., None] * omega).sum(-1)
        else:
            raise SpecError("input.positional", kind, "must be \"none\", \"random\" or \"sinusoidal\"")
        return Inputs(self.sigma + var * r, self.segments, self.mean,
                      f"{self.description} + {kind} positions (var {var:g})", self.token_ids)


def _check_count(field_name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise SpecError(field_name, v, f"must be a whole number >= {minimum}")


def _check_q(q):
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not np.isfinite(q) or q <= 0:
        raise SpecError("input.q", q, "must be a finite number > 0 (the squared token norm / d)")


def identity(tokens: int, q: float = 1.0, sequences: int = 1) -> Inputs:
    """Orthogonal tokens: ``Σ⁰ = q I`` (all sequences mutually orthogonal too)."""
    _check_count("input.tokens", tokens)
    _check_count("input.sequences", sequences)
    _check_q(q)
    n = tokens * sequences
    return Inputs(q * np.eye(n), (tokens,) * sequences, description=f"identity T={tokens} q={q:g}")


def equicorrelated(tokens: int, q: float = 1.0, rho: float = 0.5, sequences: int = 1,
                   cross_rho: float = 0.0) -> Inputs:
    """``Σ⁰ = q[(1−ρ)I + ρ11ᵀ]`` within a sequence, ``q·cross_rho`` between sequences (Noci et al. 2022)."""
    _check_count("input.tokens", tokens)
    _check_count("input.sequences", sequences)
    _check_q(q)
    if not (isinstance(rho, (int, float)) and -1.0 / max(tokens - 1, 1) <= rho <= 1):
        raise SpecError("input.rho", rho, f"must lie in [-1/(T-1), 1] = [{-1.0 / max(tokens - 1, 1):.3g}, 1]")
    if not (isinstance(cross_rho, (int, float)) and -1 <= cross_rho <= 1):
        raise SpecError("input.cross_rho", cross_rho, "must lie in [-1, 1]")
    n = tokens * sequences
    s = np.full((n, n), q * cross_rho)
    for k in range(sequences):
        sl = slice(k * tokens, (k + 1) * tokens)
        s[sl, sl] = q * ((1 - rho) * np.eye(tokens) + rho)
    return Inputs(s, (tokens,) * sequences,
                  description=f"equicorrelated T={tokens} q={q:g} rho={rho:g}" +
                  (f" x{sequences} sequences, cross_rho={cross_rho:g}" if sequences > 1 else ""))


def gram(matrix, sequences=None) -> Inputs:
    """An explicit Gram matrix ``Σ⁰`` (N×N, symmetric PSD); ``sequences`` lists the lengths (default: one)."""
    if hasattr(matrix, "files"):     # np.load of a .npz archive
        raise SpecError("input.file", f"archive of {list(matrix.files)}", "must hold one array: save the Gram "
                        "matrix with numpy.save as .npy (or as .csv), not as a .npz archive")
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpecError("input.matrix", type(matrix).__name__, f"must be a square array of numbers ({exc})") from None
    segs = (m.shape[0],) if sequences is None else tuple(sequences)
    return Inputs(m, segs, description=f"gram N={m.shape[0]}")


def tokens(ids, q: float = 1.0, rho: float = 0.0, *, pad_id: int | None = None, attention_mask=None) -> Inputs:
    """Token-id sequences through a random embedding table.

    Each vocabulary entry gets an embedding of squared norm ``q``; equal ids are identical vectors,
    distinct ids have correlation ``rho`` (0 for an i.i.d. Gaussian table in the wide limit; Kedia
    et al. 2024 model a corpus-level r₀ this way). ``ids`` is one sequence or a list of sequences.

    Padded batches: ``attention_mask`` (same shape as ``ids``, 1 = token, 0 = padding, as a tokenizer
    returns it) and/or ``pad_id`` drop the padded positions before anything is built, so each
    sequence keeps only its real tokens, at positions 0, 1, … (left or right padding alike). A
    sequence left without tokens is a :class:`SpecError`.
    """
    _check_q(q)
    seqs = _sequences(ids, "input.ids")
    flat = []
    for s in seqs:
        for t in s:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise SpecError("input.ids", t, "token ids must be whole numbers")
            flat.append(int(t))
    if not (isinstance(rho, (int, float)) and 0 <= rho <= 1):
        raise SpecError("input.rho", rho, "must lie in [0, 1] for an embedding table")
    dropped = 0
    if pad_id is not None or attention_mask is not None:
        keep = _kept_positions(seqs, pad_id, attention_mask)
        dropped = sum(len(s) for s in seqs) - sum(len(k) for k in keep)
        for k, (s, kept) in enumerate(zip(seqs, keep)):
            if not kept:
                raise SpecError("input.ids", list(s), f"sequence {k} has no tokens left once the padding "
                                "(pad_id / attention_mask) is dropped")
        seqs = [[int(s[i]) for i in kept] for s, kept in zip(seqs, keep)]
        flat = [t for s in seqs for t in s]
    ids_array = np.array(flat)
    same = ids_array[:, None] == ids_array[None, :]
    s = q * np.where(same, 1.0, rho)
    padding = f", {dropped} padded positions dropped" if dropped else ""
    return Inputs(s, tuple(len(x) for x in seqs),
                  description=f"tokens N={len(flat)} vocab={len(set(flat))}{padding}",
                  token_ids=tuple(tuple(int(t) for t in x) for x in seqs))


def _sequences(ids, field_name):
    """``ids`` as a list of sequences (one flat sequence is one sequence)."""
    try:
        seqs = [ids] if len(ids) and np.ndim(ids[0]) == 0 else list(ids)
    except TypeError:
        raise SpecError(field_name, ids, "must be a sequence (or list of sequences)") from None
    if not seqs or any(np.ndim(s) != 1 or len(s) == 0 for s in seqs):
        what = "token ids" if field_name == "input.ids" else "0/1 entries, one per token id"
        raise SpecError(field_name, ids, f"must be a non-empty sequence (or list of sequences) of {what}")
    return seqs


def _kept_positions(seqs, pad_id, attention_mask):
    """Per sequence, the positions that are neither ``pad_id`` nor masked out (mask entry 0)."""
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer))):
        raise SpecError("input.pad_id", pad_id, "must be a whole number (the padding token id)")
    masks = None
    if attention_mask is not None:
        masks = _sequences(attention_mask, "input.attention_mask")
        if [len(m) for m in masks] != [len(s) for s in seqs]:
            raise SpecError("input.attention_mask", attention_mask,
                            f"must have the shape of ids (sequence lengths {[len(s) for s in seqs]})")
        for m in masks:
            for v in m:
                if isinstance(v, str) or v not in (0, 1):
                    raise SpecError("input.attention_mask", v, "entries must be 1 (token) or 0 (padding)")
    return [[i for i, t in enumerate(s)
             if (pad_id is None or int(t) != pad_id) and (masks is None or masks[k][i] == 1)]
            for k, s in enumerate(seqs)]
