"""Never a silent wrong answer from a spec: every field's type is checked (Python and TOML), an override
naming no param is refused, and params no expression uses are warned about (kernelprop issue 14)."""

import collections.abc
import dataclasses
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

import kernelprop as kp
from kernelprop import models
from kernelprop.errors import SpecError
from kernelprop.layers import LAYERS, Attention, Dense, Layer, LayerNorm, register_layer, unregister_layer
from kernelprop.layers.base import _field_types
from kernelprop.network.network import UnusedParamsWarning

# the fields typed Any (their layer checks them by hand): a wrong value of each
WRONG_ANY = {("activation", "name"): 3, ("gated_mlp", "activation"): 3, ("attention", "bias"): True,
             ("attention", "rope_dim"): "8"}


def _wrong_values(kind, f, tp):
    """Values of the wrong type for the field ``f`` (annotation ``tp``)."""
    if "numeric" in f.metadata:
        return [True, "1 +", [1.0]] + ([None] if f.default is not None else [])
    if "choice" in f.metadata:
        return ["not_an_option", 1, True, None]
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"),
                                                                                    "UnionType", None)) else (tp,)
    members = tuple(typing.get_origin(m) or m for m in members)
    out = []
    if bool in members:
        out += ["false", "no", 0, 1.0]
    if int in members:
        out += [2.0, "2", True]
    if collections.abc.Mapping in members:
        out += [3, "a", [1]]
    if collections.abc.Callable in members:
        out += ["x", 3]
    if tuple in members:
        out += ["0", 3]
    if type(None) not in members and members != (typing.Any,):
        out.append(None)
    if members == (typing.Any,):
        assert (kind, f.name) in WRONG_ANY, f"{kind}.{f.name} is typed Any: add a wrong value to WRONG_ANY"
        out.append(WRONG_ANY[kind, f.name])
    assert out, f"no wrong value known for {kind}.{f.name}: {tp}"
    return out


def _cases():
    for kind, cls in LAYERS.items():
        if not dataclasses.is_dataclass(cls) or not cls.__module__.startswith("kernelprop."):
            continue
        types = _field_types(cls)
        for f in dataclasses.fields(cls):
            for v in _wrong_values(kind, f, types[f.name]):
                yield kind, f.name, v


CASES = list(_cases())


def test_every_field_of_every_layer_kind_has_wrong_values_to_try():
    fields = {(k, n) for k, n, _ in CASES}
    for kind, cls in LAYERS.items():
        if dataclasses.is_dataclass(cls) and cls.__module__.startswith("kernelprop."):
            assert {(kind, f.name) for f in dataclasses.fields(cls)} <= fields
    assert ("layernorm", "centre") in fields and ("attention", "causal") in fields
    assert len(CASES) > 150


@pytest.mark.parametrize(("kind", "name", "value"), CASES, ids=[f"{k}.{n}={v!r}" for k, n, v in CASES])
def test_a_wrong_typed_field_in_python_is_a_spec_error_naming_it(kind, name, value):
    with pytest.raises(SpecError) as exc:
        LAYERS[kind](**{name: value})
    # the activation name is reported under the layer's kind (the field holds the activation)
    assert exc.value.field in (f"{kind}.{name}", kind if name == "name" else None) or \
        exc.value.field.startswith(f"{kind}.{name}.")


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(e) for e in v) + "]"
    return repr(v)


TOML_CASES = [(k, n, v) for k, n, v in CASES if v is not None and n != "derivative"]


@pytest.mark.parametrize(("kind", "name", "value"), TOML_CASES, ids=[f"{k}.{n}={v!r}" for k, n, v in TOML_CASES])
def test_a_wrong_typed_field_in_toml_is_a_spec_error_naming_its_path(kind, name, value):
    text = f'[[block]]\ntype = "{kind}"\n{name} = {_toml(value)}\n[input]\nkind = "identity"\ntokens = 3\n'
    with pytest.raises(SpecError) as exc:
        kp.loads(text)
    field = "activation" if (kind, name) == ("activation", "name") else name
    assert exc.value.field == f"block[0].{field}" or exc.value.field.startswith(f"block[0].{field}.")


def test_callable_fields_refuse_non_callables_in_toml():
    text = '[[block]]\ntype = "gated_mlp"\nderivative = "x"\n[input]\nkind = "identity"\n'
    with pytest.raises(SpecError, match=r"block\[0\]\.derivative"):
        kp.loads(text)


def test_string_booleans_no_longer_run_causal_attention_or_keep_centring():
    """Before: ``causal = "false"`` ran causal attention and ``centre = "no"`` centred (truthy strings)."""
    for table, field in (('type = "attention"\ncausal = "false"', "causal"), ('type = "layernorm"\ncentre = "no"',
                                                                            "centre")):
        text = f'[[block]]\n{table}\n[input]\nkind = "identity"\ntokens = 4\n'
        with pytest.raises(SpecError, match=rf"block\[0\]\.{field} = '.*': must be true or false"):
            kp.loads(text)
    with pytest.raises(SpecError, match="attention.causal"):
        Attention(causal="false")
    with pytest.raises(SpecError, match="layernorm.centre"):
        LayerNorm(centre=0)


def test_booleans_and_numpy_booleans_are_accepted_and_stored_as_bool():
    a = Attention(causal=np.bool_(True))
    assert a.causal is True
    assert LayerNorm(centre=np.False_).centre is False
    # causal attention over a uniform score: token 1 sees itself only, so its kernel row is the input's
    x = kp.inputs.identity(3)
    k_causal = kp.propagate(kp.Network(block=[Attention(causal=np.bool_(True))], depth=1), x).kernels[-1]
    k_full = kp.propagate(kp.Network(block=[Attention(causal=False)], depth=1), x).kernels[-1]
    np.testing.assert_allclose(k_causal[0, 0], 1.0, rtol=1e-14)          # attends to itself alone
    np.testing.assert_allclose(k_full, np.full((3, 3), 1 / 3), rtol=1e-14)  # the mean of three orthogonal tokens


def test_composite_weights_refuse_booleans_and_lists():
    for make, field in ((lambda: kp.Residual([Dense()], beta=True), "residual.beta"),
                        (lambda: kp.Residual([Dense()], alpha=[1.0]), "residual.alpha"),
                        (lambda: kp.Parallel([Dense()], alpha="yes +"), "parallel.alpha"),
                        (lambda: kp.Parallel([Dense()], betas=[False]), "parallel.betas[0]")):
        with pytest.raises(SpecError) as exc:
            make()
        assert exc.value.field == field
    text = ('[[block]]\ntype = "residual"\nbeta = true\nlayers = [{type = "dense"}]\n'
            '[input]\nkind = "identity"\n')
    with pytest.raises(SpecError, match=r"block\[0\]\.beta"):
        kp.loads(text)


BASE = '[[block]]\ntype = "dense"\n[input]\nkind = "{kind}"\n{extra}\n'


@pytest.mark.parametrize(("top", "field"), [
    ('shared_weights = "yes"', "shared_weights"), ("shared_weights = 1", "shared_weights"),
    ('depth = "2"', "depth"), ("depth = 2.0", "depth"), ("depth = true", "depth"),
    ("name = 3", "name"), ("description = true", "description"), ("params = 3", "params"),
])
def test_network_level_fields_are_type_checked(top, field):
    with pytest.raises(SpecError) as exc:
        kp.loads(top + "\n" + BASE.format(kind="identity", extra=""))
    assert exc.value.field == field


@pytest.mark.parametrize(("kind", "extra", "field"), [
    ("identity", "causal = true", "input.causal"),
    ("identity", 'tokens = "4"', "input.tokens"), ("identity", "tokens = true", "input.tokens"),
    ("identity", "q = true", "input.q"), ("identity", 'sequences = "2"', "input.sequences"),
    ("equicorrelated", "rho = true", "input.rho"), ("equicorrelated", 'rho = "0.5"', "input.rho"),
    ("equicorrelated", "cross_rho = true", "input.cross_rho"),
    ("identity", 'positional = "sinusoidal"\npositional_var = true', "input.positional_var"),
    ("identity", 'positional = "sinusoidal"\npositional_dim = "8"', "input.positional_dim"),
    ("identity", "positional = true", "input.positional"),
    ("gram", "matrix = [[true, false], [false, true]]", "input.matrix"),
    ("gram", 'matrix = "eye"', "input.matrix"),
    ("tokens", 'ids = [[1, 2]]\npad_id = true', "input.pad_id"),
    ("tokens", "ids = [[true, false]]", "input.ids"),
])
def test_input_fields_are_type_checked(kind, extra, field):
    with pytest.raises(SpecError) as exc:
        kp.loads(BASE.format(kind=kind, extra=extra))
    assert exc.value.field == field


@pytest.mark.parametrize(("record", "field"), [('every = "2"', "record.every"), ("every = true", "record.every"),
                                               ("every = 2.0", "record.every"), ("mode = 3", "record.mode")])
def test_record_fields_are_type_checked(record, field):
    with pytest.raises(SpecError) as exc:
        kp.loads(BASE.format(kind="identity", extra="") + "[record]\n" + record + "\n")
    assert exc.value.field == field


def test_network_fields_are_type_checked_in_python():
    for kwargs, field in (({"shared_weights": "yes"}, "shared_weights"), ({"depth": "2"}, "depth"),
                          ({"name": 3}, "name"), ({"params": {"b": True}}, "params.b")):
        with pytest.raises(SpecError) as exc:
            kp.Network(block=[Dense()], **{"depth": 1, **kwargs})
        assert exc.value.field == field


# ----------------------------------------------------------------------------------------------
# overrides (--set) and unused params

SPEC = """
[params]
beta = 0.5
[[block]]
type = "residual"
beta = "beta"
layers = [{type = "dense"}, {type = "relu"}]
[[block]]
type = "dense"
weight_var = "w"
[input]
kind = "identity"
tokens = 3
"""


def test_an_unknown_override_is_a_spec_error_naming_it_and_listing_the_params():
    """Before: ``--set betta=2`` was ignored and the run used beta = 0.5."""
    with pytest.raises(SpecError) as exc:
        kp.loads(SPEC, params={"betta": 2.0, "w": 1.0})
    assert exc.value.field == "params.betta" and "['beta', 'w']" in exc.value.allowed
    with pytest.raises(SpecError, match=r"params\.betta = 2\.0: .*known params: \['beta'\]"):
        models.load("pre_ln", overrides=["betta=2"])
    with pytest.raises(SpecError, match=r"params\.x"):
        models.sweep_model("pre_ln", overrides={"x": 1.0})


def test_an_override_of_a_param_or_of_a_name_an_expression_uses_takes_effect():
    """``w`` is used by ``weight_var`` but not in [params]: the override supplies it. Residual of
    ReLU(dense) on unit-norm orthogonal tokens: q' = α² q + β² q/2 (ReLU halves), then the dense × w."""
    for beta, w in ((0.5, 2.0), (1.0, 0.25)):
        s = kp.loads(SPEC, params={"beta": beta, "w": w})
        traj = kp.propagate(s.network, s.inputs)
        np.testing.assert_allclose(np.diagonal(traj.kernels[-1]), w * (1 + beta ** 2 / 2), rtol=1e-12)
    with pytest.raises(SpecError, match=r"uses unknown name\(s\) \['w'\]"):
        kp.loads(SPEC)   # without the override, `w` is undefined


def test_with_params_refuses_an_unknown_name_and_accepts_known_ones():
    s = kp.loads(SPEC, params={"w": 1.0})
    with pytest.raises(SpecError) as exc:
        s.network.with_params(betta=2.0)
    assert exc.value.field == "params.betta" and "beta" in exc.value.allowed
    assert s.network.with_params(beta=0.1).params["beta"] == 0.1


def test_unused_params_are_warned_about_by_name_in_toml_and_python():
    text = SPEC.replace("beta = 0.5", "beta = 0.5\nbetta = 2.0\nw = 1.0")
    with pytest.warns(UnusedParamsWarning, match=r"\['betta'\] is used by no expression"):
        kp.loads(text)
    with pytest.warns(UnusedParamsWarning, match=r"\['a', 'b'\]"):
        kp.Network(block=[Dense(weight_var="c")], depth=2, params={"a": 1.0, "b": 2.0, "c": 1.0})


def test_used_params_give_no_warning_and_copies_do_not_repeat_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedParamsWarning)
        s = kp.loads(SPEC, params={"w": 1.0})
        for name in models.examples():
            models.load(name)
        net = kp.Network(block=[Dense(weight_var="c")], depth=2, params={"c": 1.0})
        assert net.unused_params() == []
    with pytest.warns(UnusedParamsWarning) as record:
        net = kp.Network(block=[Dense()], depth=2, params={"a": 1.0})
        net.with_depth(3).with_params(a=2.0)
    assert len(record) == 1
    assert s.network.unused_params() == []


def test_an_activation_params_table_in_toml_is_used_not_dropped():
    """Before: ``params = {slope = 0.5}`` on a leaky_relu table was dropped (slope 0.01 used: q' 0.50005).
    Leaky ReLU of a unit Gaussian: E[φ(z)²] = (1 + a²)/2, 0.625 at a = 0.5."""
    for extra in ("params = {slope = 0.5}", "slope = 0.5"):
        s = kp.loads(f'[[block]]\ntype = "leaky_relu"\n{extra}\n[input]\nkind = "identity"\ntokens = 2\n')
        np.testing.assert_allclose(kp.propagate(s.network, s.inputs).kernels[-1][0, 0], 0.625, rtol=1e-12)
    with pytest.raises(SpecError, match=r"block\[0\]\.slope = 0\.2: is also given in block\[0\]\.params"):
        kp.loads('[[block]]\ntype = "leaky_relu"\nslope = 0.2\nparams = {slope = 0.5}\n[input]\nkind = "identity"\n')


def test_override_values_must_be_numbers_and_each_name_is_given_once():
    with pytest.raises(SpecError, match=r"overrides\.beta = True: must be a number"):
        models.load("pre_ln", overrides={"beta": True})
    with pytest.raises(SpecError, match="a second time"):
        models.load("pre_ln", overrides=["beta=0.5", "beta=2"])
    with pytest.raises(SpecError, match="NAME=NUMBER"):
        models.load("pre_ln", overrides=["beta=true"])
    assert models.load("pre_ln", overrides={"beta": np.float64(0.25)}).network.params["beta"] == 0.25
    assert kp.Network(block=[Dense(weight_var="c")], depth=1, params={"c": np.int64(2)}).params["c"] == 2


@dataclass(frozen=True, eq=False)
class _Typed(Layer):
    """A layer with plain annotated fields and no checks of its own (string annotations included)."""

    k: "int" = 2
    on: bool = False
    x: float = 1.0
    label: "str | None" = None
    opts: "Mapping" = dataclasses.field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    weights: "np.ndarray | None" = None
    kind = "typed_test_layer"

    def kernel_map(self, s, ctx):
        return s, self.no_backward()


@pytest.mark.parametrize(("field", "value"), [("k", 2.5), ("k", "2"), ("k", True), ("on", "false"), ("on", 1),
                                              ("x", "1.0"), ("x", False), ("label", 3), ("opts", [1]),
                                              ("mode", "c"), ("mode", 1), ("weights", 1.0)])
def test_a_layer_added_later_is_checked_by_its_annotations_without_checks_of_its_own(field, value):
    register_layer(_Typed)
    try:
        with pytest.raises(SpecError) as exc:
            _Typed(**{field: value})
        assert exc.value.field == f"typed_test_layer.{field}"
        with pytest.raises(SpecError) as exc:
            kp.loads(f'[[block]]\ntype = "typed_test_layer"\n{field} = {_toml(value)}\n[input]\nkind = "identity"\n')
        assert exc.value.field == f"block[0].{field}"
        ok = _Typed(k=np.int64(3), on=np.True_, x=2, label="s", opts={"a": 1}, mode="b", weights=[1.0, 2.0])
        assert ok.on is True and ok.k == 3
        assert kp.loads('[[block]]\ntype = "typed_test_layer"\nweights = [1.0, 2.0]\non = true\n'
                        '[input]\nkind = "identity"\n').network.block.layers[0].on is True
    finally:
        unregister_layer("typed_test_layer")


@pytest.mark.parametrize(("field", "value"), [("causal", "false"), ("causal", 0), ("heads", 2.0), ("tokens", True),
                                              ("rho", "0.1"), ("scores", None), ("activation", 3)])
def test_preset_options_are_type_checked(field, value):
    with pytest.raises(SpecError) as exc:
        models.PresetOptions(**{field: value})
    assert exc.value.field == f"options.{field}"
    assert models.PresetOptions(causal=np.False_).causal is False
