"""Property-based fuzzing of spec files and command lines (issue 14): every input ends with exit 0, or
exit 1/2 (3 for ``check``) and a one-line message on stderr, never a traceback, a hang or a partial file.

``KERNELPROP_FUZZ_EXAMPLES`` raises the number of examples per property for a longer hunt."""

import json
import math
import os
import signal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kernelprop.cli import app

runner = CliRunner()
EXAMPLES = int(os.environ.get("KERNELPROP_FUZZ_EXAMPLES", "300"))
TALLY = os.environ.get("KERNELPROP_FUZZ_TALLY")   # a file: count clean/unclean inputs there instead of failing
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SECONDS = 20     # a single input taking longer than this counts as a hang


class _Hang(BaseException):     # not an Exception: no handler in the code under test may swallow it
    pass


def _alarm(*_):
    raise _Hang


def invoke(args):
    """Run the CLI in-process with a wide console (messages on one line) and a hang alarm."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        return runner.invoke(app, args, env={"COLUMNS": "1000"})
    except _Hang:
        return _Hung(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class _Hung:
    """The result of an input that ran longer than ``SECONDS``."""

    def __init__(self, args):
        self.exception, self.exit_code, self.output, self.stderr = _Hang(f"hang: {args}"), None, "", ""


def assert_clean(res, out=None, codes=(0, 1, 2)):
    if not TALLY:
        return _assert_clean(res, out, codes)
    try:
        _assert_clean(res, out, codes)
        verdict = "clean"
    except AssertionError as e:
        verdict = f"unclean {str(e).splitlines()[0][:150]!r}"
    with open(TALLY, "a") as f:
        f.write(verdict + "\n")


def _assert_clean(res, out=None, codes=(0, 1, 2)):
    exc = res.exception
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {exc!r}"
    assert res.exit_code in codes, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    if res.exit_code != 0:
        lines = [x for x in res.stderr.splitlines() if x.strip() and not x.startswith("warning:")]
        if not res.stderr.startswith("Usage:"):      # the argument parser's own usage box (bad option syntax)
            assert len(lines) == 1, res.stderr
        if out is not None:
            assert not out.exists(), "partial output left behind"
            left = list(out.parent.iterdir()) if out.parent.exists() else []
            assert not [p for p in left if p.name.startswith(f".{out.name}.")], "temporary file left behind"


# ---- values ---------------------------------------------------------------------------------------

expr_leaf = st.sampled_from(["L", "l", "1", "2", "0", "0.5", "1e308", "pi", "e", "beta", "nope", "10", "-1"])


def _expr(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**"]), children)
        .map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        st.tuples(st.sampled_from(["sqrt", "exp", "log", "sin", "tanh", "abs", "min", "max", "print", "__import__"]),
                  st.lists(children, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        children.map(lambda c: f"-{c}"),
    )


expressions = st.recursive(expr_leaf, _expr, max_leaves=8)
odd_strings = st.one_of(st.text(max_size=12), st.sampled_from(
    ["[red]x[/red]", "\x1b[31m", "\x00", "a\nb", "🙂", "'", '"""', "1_000", "0x10", "inf", "nan", "relu"]))
numbers = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2, 1e300, -1e-300, 10**6]))
values = st.one_of(numbers, odd_strings, expressions, st.booleans(), st.lists(st.integers(-3, 40), max_size=4),
                   st.just({"a": 1}))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def toml(spec: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in spec.items() if not isinstance(v, (dict, list))
             or (isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.append(f"[{json.dumps(k)}]")
            lines += [f"{json.dumps(a)} = {toml_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"[[{json.dumps(k)}]]")
                lines += [f"{json.dumps(a)} = {toml_value(b)}" for a, b in item.items()]
    return "\n".join(lines) + "\n"


LAYERS = [
    {"type": "dense", "weight_var": 2.0, "bias_var": 0.0},
    {"type": "relu"}, {"type": "layernorm"}, {"type": "tanh"},
    {"type": "attention", "heads": 2, "causal": True, "scores": "tied"},
    {"type": "residual", "beta": "beta/sqrt(L)", "layers": [{"type": "dense", "weight_var": 1.0}]},
]
FIELDS = ["weight_var", "bias_var", "beta", "alpha", "heads", "causal", "scores", "type", "layers", "gain",
          "eps", "value_var", "width_factor", "bogus"]


@st.composite
def specs(draw) -> dict:
    spec = {"depth": draw(st.one_of(st.integers(1, 4), values)) if draw(st.booleans()) else 3,
            "params": {"beta": draw(st.one_of(st.just(1.0), values))},
            "input": {"kind": draw(st.sampled_from(["identity", "equicorrelated", "gram", "tokens", "x"])),
                      "tokens": draw(st.one_of(st.integers(1, 6), values)),
                      "rho": draw(st.one_of(st.just(0.2), values))},
            "block": [dict(x) for x in draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3))]}
    for _ in range(draw(st.integers(0, 3))):          # mutate fields of the skeleton
        where = draw(st.sampled_from(["top", "params", "input", "block"]))
        key, val = draw(st.sampled_from(FIELDS + ["depth", "name", "q", "sequences", "matrix"])), draw(values)
        if where == "top":
            spec[key] = val
        elif where == "block":
            spec["block"][draw(st.integers(0, len(spec["block"]) - 1))][key] = val
        else:
            spec[where][key if where == "input" else draw(st.sampled_from(["beta", "Integer", "S", "x1"]))] = val
    for table in draw(st.lists(st.sampled_from(["params", "input", "block"]), max_size=1)):
        spec.pop(table)                                  # a missing table
    return spec


@FUZZ
@given(spec=specs(), command=st.sampled_from([["run"], ["gradients"], ["symbolic"], ["run", "--ntk"]]),
       fmt=st.sampled_from([".json", ".csv", ".npz", ".txt"]))
def test_fuzz_spec_files(tmp_path_factory, spec, command, fmt):
    d = tmp_path_factory.mktemp("spec")
    path = d / "s.toml"
    path.write_text(toml(spec))
    out = d / f"out{fmt}"
    args = [*command, str(path)] + (["-o", str(out)] if command[0] != "symbolic" else [])
    res = invoke(args)
    assert_clean(res, out if command[0] != "symbolic" else None)


option_values = st.one_of(st.sampled_from(["0", "-1", "2", "3", "1e9", "nan", "x", "", "300", "99999999999999999999"]),
                          st.text(max_size=6))
OPTIONS = {
    "run": ["--depth", "--set", "--every", "--rows", "--tokens", "--rho", "--heads", "--scores", "--activation",
            "--preset"],
    "gradients": ["--depth", "--set", "--tokens", "--rho", "--output-grad", "--grad-rho"],
    "symbolic": ["--depth", "--set", "--explicit", "--symbol"],
    "examples": [], "spec-reference": [],
}


@FUZZ
@given(command=st.sampled_from(sorted(OPTIONS)), data=st.data(),
       target=st.sampled_from(["relu_mlp", "vanilla", "pre_ln", "nope", "", "/", "examples"]))
def test_fuzz_command_lines(tmp_path_factory, command, data, target):
    args = [command]
    if command in ("run", "gradients", "symbolic"):
        if command != "symbolic" and data.draw(st.booleans()):     # a preset, small; or the spec (its own input)
            args += ["--preset", target, "--depth", "2", "--tokens", "4"]
        else:
            args += [target, "--depth", "2"]
    for _ in range(data.draw(st.integers(0, 3))):
        if OPTIONS[command]:
            args += [data.draw(st.sampled_from(OPTIONS[command])), data.draw(option_values)]
    out = None
    if command in ("run", "gradients") and data.draw(st.booleans()):
        d = tmp_path_factory.mktemp("cli")
        out = d / data.draw(st.sampled_from(["r.json", "r.csv", "sub/r.json", "r.npz", "r"]))
        args += ["-o", str(out)]
    res = invoke(args)
    assert_clean(res, out)
