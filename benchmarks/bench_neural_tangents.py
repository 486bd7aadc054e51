"""kernelprop.propagate against Neural Tangents' jitted kernel_fn on the same 24-block Pre-LN network.

Usage: python benchmarks/bench_neural_tangents.py [--quick] [--sizes 64,256,1024] [--single-thread]

Neural Tangents (jax) is not a dependency of kernelprop: this script makes its own virtual environment,
benchmarks/.venv-nt (git-ignored; ``--venv PATH`` for another place), installs pinned versions into it with
pip on first use, and runs the Neural Tangents side there in a subprocess. The two sides exchange the input
and the kernels through a temporary .npz file.

The network (both sides, float64): a Dense stem (σ_w² = 1), then 24 blocks
``x ← x + Attn(LN x); x ← x + MLP(LN x)`` with tied 1/d softmax attention (σ_qk² = 1, value and output
weights σ² = 1, one head, bidirectional; Neural Tangents' ``GlobalSelfAttention(linear_scaling=True)``, Hron
et al. 2020), MLP ``Dense(1) → ReLU → Dense(2)``, and a final LayerNorm. The input kernel is ``X Xᵀ/d`` of a
seeded Gaussian X (T × 32). The script prints the largest relative difference of the two output kernels
(must be ≤ 1e-12), the compile time of the jitted kernel_fn (reported separately), and the steady-state
time per call of each (best of several calls), with the ratio NT / kernelprop (> 1: kernelprop faster).
Threads: each side's defaults (XLA's thread pool; kernelprop's choice of BLAS threads), or one thread each
with ``--single-thread``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEPTH = 24
FEATURES = 32
# jax 0.4.30 is the last series whose jax.core still has what neural-tangents 0.6.5 imports; the package's
# optional TensorFlow module (neural_tangents.experimental) is not installed nor imported (stubbed below).
PINS = ["jax==0.4.30", "jaxlib==0.4.30", "numpy<2.1", "scipy", "absl-py", "frozendict", "typing_extensions"]
NT_PIN = "neural-tangents==0.6.5"
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ----------------------------------------------------------------------------------------------
# the Neural Tangents side (runs inside the venv)

def nt_worker(path: str, repeat: int) -> None:
    import types
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from neural_tangents import stax

    def block():
        attn = stax.GlobalSelfAttention(n_chan_out=FEATURES, n_chan_key=FEATURES, n_chan_val=FEATURES, n_heads=1,
                                        linear_scaling=True, attention_mechanism="SOFTMAX")
        mlp = [stax.Dense(FEATURES, W_std=1.0), stax.Relu(), stax.Dense(FEATURES, W_std=np.sqrt(2.0))]
        return [stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(stax.LayerNorm(axis=-1, eps=0.0), attn)),
                stax.FanInSum(),
                stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(stax.LayerNorm(axis=-1, eps=0.0), *mlp)),
                stax.FanInSum()]

    layers = [stax.Dense(FEATURES, W_std=1.0)]
    for _ in range(DEPTH):
        layers += block()
    layers.append(stax.LayerNorm(axis=-1, eps=0.0))
    _, _, kernel_fn = stax.serial(*layers)
    fn = jax.jit(kernel_fn, static_argnames="get")
    data = dict(np.load(path))
    out = {}
    for key in [k for k in data if k.startswith("x_")]:
        x = jnp.asarray(data[key][None])
        t0 = time.perf_counter()
        k = fn(x, None, "nngp").block_until_ready()
        compile_s = time.perf_counter() - t0
        best = np.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(x, None, "nngp").block_until_ready()
            best = min(best, time.perf_counter() - t0)
        out["k_" + key[2:]] = np.asarray(k).reshape(x.shape[1], x.shape[1])
        out["compile_" + key[2:]] = compile_s
        out["time_" + key[2:]] = best
    np.savez(path, **out)
    print(json.dumps({"jax": jax.__version__}))


# ----------------------------------------------------------------------------------------------
# the kernelprop side

def venv_python(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print(f"creating {venv} (first run: pip installs jax and neural-tangents, a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + PINS, check=True)
        subprocess.run(pip + ["--no-deps", NT_PIN], check=True)
    return py


def kp_network():
    import kernelprop as kp
    block = [kp.Residual(kp.LayerNorm(), kp.Attention(scores="tied", heads=1)),
             kp.Residual(kp.LayerNorm(), kp.Dense(weight_var=1.0), kp.Activation("relu"), kp.Dense(weight_var=2.0))]
    return kp.Network(block=block, depth=DEPTH, stem=[kp.Dense(weight_var=1.0)], final=[kp.LayerNorm()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s once the venv exists)")
    ap.add_argument("--sizes", default="64,256,1024", help="sequence lengths T, comma-separated")
    ap.add_argument("--single-thread", action="store_true", help="one thread on each side")
    ap.add_argument("--venv", default=os.path.join(HERE, ".venv-nt"), help="where the Neural Tangents venv lives")
    ap.add_argument("--nt-worker", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeat = args.repeat or (3 if args.quick else 7)
    if args.nt_worker:
        nt_worker(args.nt_worker, repeat)
        return

    import numpy as np
    sys.path.insert(0, ROOT)          # this checkout's kernelprop
    sizes = [int(t) for t in args.sizes.split(",")]
    py = venv_python(args.venv)
    rng = np.random.default_rng(2024)
    xs = {f"x_{t}": rng.standard_normal((t, FEATURES)) for t in sizes}
    env = dict(os.environ)
    threads = None
    if args.single_thread:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
        threads = 1
    # kernelprop first: the NT subprocess raises the 1-minute load average for a minute after, which would make
    # kernelprop's own thread rule (kernelprop.kernel.threads.choose) see a busy machine and take one thread
    import kernelprop as kp
    from kernelprop import inputs as I
    from kernelprop.kernel.threads import choose
    net = kp_network()
    ours = {}
    for t in sizes:
        x = xs[f"x_{t}"]
        inp = I.gram(x @ x.T / FEATURES)
        ref = kp.propagate(net, inp, every=DEPTH, keep_kernels=True, measures=(), threads=threads).kernels[-1]
        run = lambda: kp.propagate(net, inp, every=DEPTH, keep_kernels=False, measures=(), threads=threads)  # noqa: B023
        run()
        best = np.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        ours[t] = (ref, best, choose(t, threads))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "exchange.npz")
        np.savez(path, **xs)
        t0 = time.perf_counter()
        info = subprocess.run([py, os.path.abspath(__file__), "--nt-worker", path, "--repeat", str(repeat)],
                              env=env, check=True, capture_output=True, text=True)
        nt_total = time.perf_counter() - t0
        nt = dict(np.load(path))
    versions = json.loads(info.stdout.strip().splitlines()[-1])

    print(f"24-block Pre-LN, tied softmax attention, float64; jax {versions['jax']} (NT subprocess {nt_total:.1f} s "
          f"in all); load average {os.getloadavg()[0]:.2f}; "
          f"{'one thread each' if args.single_thread else 'default threads'}\n")
    print("| T | max rel. diff | NT compile s | NT steady ms | kernelprop ms | BLAS threads | NT / kernelprop |")
    print("|---|---|---|---|---|---|---|")
    worst, ratios = 0.0, []
    for t in sizes:
        ref, best, n_threads = ours[t]
        k = nt[f"k_{t}"]
        diff = float(np.max(np.abs(ref - k)) / np.max(np.abs(k)))
        worst = max(worst, diff)
        ntt = float(nt[f"time_{t}"])
        print(f"| {t} | {diff:.1e} | {float(nt[f'compile_{t}']):.2f} | {1e3 * ntt:.3g} | {1e3 * best:.3g} | "
              f"{n_threads} | {ntt / best:.2f} |", flush=True)
        ratios.append((t, ntt / best))
    print(f"\nkernels equal to {worst:.1e} relative ({'ok' if worst <= 1e-12 else 'NOT within 1e-12'})")
    for t, r in ratios:        # headline lines for benchmarks/run_all.py
        print(f"RESULT | Neural Tangents steady state / kernelprop, 24-block Pre-LN, T = {t} | {r:.6g} | × | >= 3 |")
    print(f"RESULT | kernelprop vs Neural Tangents kernels, max relative difference | {worst:.6g} | - | <= 1e-12 |")
    if worst > 1e-12:
        sys.exit(1)


if __name__ == "__main__":
    main()
