"""Reference values for tests/test_standard_scores.py: 10⁶-draw plain numpy estimates of ``E[A K Aᵀ]`` and
``E[Aᵀ Π A]`` for standard 1/sqrt(d_k) scores, written to standard_scores_ref.npz next to this script.

Independent of the engine: the covariance of vec(S), ``Cov(S_ij, S_kl) = v K_ik K_jl ρ((t_j − t_i) − (t_l − t_k))``,
is built entry by entry (ρ from its definition, a mean of cosines over the frequencies ``θ^{−2f/D}``), factored
by eigh; the ALiBi slopes, masks and softmax are written out here.
Run: ``python tests/data/make_standard_scores_ref.py`` (about a minute; seed 20261124)."""

import itertools
import pathlib

import numpy as np

SCALES = (0.01, 0.1, 0.5, 1.0, 4.0)
VARIANTS = {"bidirectional": ((4,), {}), "causal": ((4,), {"causal": True}),
            "alibi": ((4,), {"bias": "alibi", "heads": 2}), "rope": ((4,), {"rope_theta": 100.0, "rope_dim": 8}),
            "batch": ((2, 2), {})}
DRAWS, CHUNK = 1_000_000, 50_000


def kernels():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((4, 6))
    wish = g @ g.T / 6
    d = 1.0 / np.sqrt(np.diag(wish))
    return {"equicorrelated": 0.5 * np.eye(4) + 0.5, "wishart": 1.3 * wish * d[:, None] * d[None, :]}


def pi_matrix():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((4, 4))
    return g @ g.T / 4 + 0.2


def rho(delta, theta, dim):
    w = theta ** (-2.0 * np.arange(dim // 2) / dim)
    return float(np.mean(np.cos(w * delta)))


def reference(kernel, v, segments, opts, pi, rng):
    n = sum(segments)
    pos = np.concatenate([np.arange(t) for t in segments])
    cov = np.zeros((n * n, n * n))
    for (i, j), (k, l) in itertools.product(itertools.product(range(n), repeat=2), repeat=2):
        r = 1.0
        if "rope_theta" in opts:
            r = rho((pos[j] - pos[i]) - (pos[l] - pos[k]), opts["rope_theta"], opts["rope_dim"])
        cov[i * n + j, k * n + l] = v * kernel[i, k] * kernel[j, l] * r
    w, u = np.linalg.eigh(cov)
    fac = u * np.sqrt(np.clip(w, 0.0, None))
    heads = opts.get("heads", 1)
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
    sums = np.zeros((2, n, n))
    squares = np.zeros((2, n, n))
    for h in range(heads):
        offs = []
        for t in segments:
            q = np.arange(t)
            off = np.zeros((t, t))
            if "bias" in opts:
                off = -slopes[h] * np.abs(q[:, None] - q[None, :])
            if opts.get("causal"):
                off = np.where(q[:, None] >= q[None, :], off, -np.inf)
            offs.append(off)
        for _ in range(DRAWS // CHUNK):
            s = (rng.standard_normal((CHUNK, n * n)) @ fac.T).reshape(CHUNK, n, n)
            a = np.zeros((CHUNK, n, n))
            lo = 0
            for t, off in zip(segments, offs):
                z = s[:, lo:lo + t, lo:lo + t] + off
                z = np.exp(z - z.max(axis=-1, keepdims=True))
                a[:, lo:lo + t, lo:lo + t] = z / z.sum(axis=-1, keepdims=True)
                lo += t
            for j, x in enumerate((a @ kernel @ np.swapaxes(a, 1, 2), np.swapaxes(a, 1, 2) @ pi @ a)):
                sums[j] += x.sum(axis=0) / heads
                squares[j] += (x * x).sum(axis=0) / heads
    mean = sums / DRAWS
    # the heads draw independently: the head average's variance is mean_h(var_h)/(H·DRAWS); the variance of the
    # pooled draws, used here, is at least mean_h(var_h) (conservative)
    var = np.clip(squares / DRAWS - mean ** 2, 0.0, None)
    return mean, np.sqrt(var / (DRAWS * heads))


def main():
    rng = np.random.default_rng(20261124)
    out = {}
    pi = pi_matrix()
    for (kname, kernel), v, (vname, (segs, opts)) in itertools.product(kernels().items(), SCALES, VARIANTS.items()):
        mean, se = reference(kernel, v, segs, opts, pi, rng)
        out[f"{kname}/{v}/{vname}"] = np.stack([mean, se])
        print(kname, v, vname, float(se.max()))
    np.savez_compressed(pathlib.Path(__file__).with_name("standard_scores_ref.npz"), **out)


if __name__ == "__main__":
    main()
