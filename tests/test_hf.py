"""Hugging Face configs to specs (kernelprop.io.hf), the bundled real-model examples, padded token
inputs, and the framework → kernelprop table of docs/inits.md (every row exercised).

Specs that use the spec features being added alongside the importer (layer type ``gated_mlp``,
attention field ``rope_theta``, activation ``gelu_tanh``, top-level ``shared_weights``) are loaded
only when this checkout has them; otherwise those tests skip and say which feature is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import erfc
from scipy.stats import norm as normal_dist

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop.errors import SpecError
from kernelprop.io import hf
from kernelprop.kernel.activations import ACTIVATIONS
from kernelprop.layers import LAYERS
from kernelprop.network import expressions
from kernelprop.network.spec import TOP_KEYS, from_dict

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data" / "hf"
EXAMPLES = ROOT / "kernelprop" / "examples"
CONFIGS = sorted(p.name for p in DATA.glob("*.json") if p.stem not in ("t5_unknown", "gpt2_no_n_embd"))


# ----------------------------------------------------------------------------------------------
# helpers


def unmerged(raw: dict) -> list:
    """The spec features ``raw`` uses that this checkout does not have yet."""
    missing = [f"top-level field {k!r}" for k in raw if k not in TOP_KEYS]

    def walk(layer):
        kind = layer.get("type")
        if kind in ("residual", "serial"):
            for sub in layer["layers"]:
                walk(sub)
        elif kind == "parallel":
            for branch in layer["branches"]:
                for sub in branch["layers"]:
                    walk(sub)
        elif kind in LAYERS:
            fields = {f.name for f in dataclasses.fields(LAYERS[kind])}
            missing.extend(f"{kind} field {k!r}" for k in layer if k != "type" and k not in fields)
            if kind == "gated_mlp" and layer.get("activation", "silu") not in ACTIVATIONS:
                missing.append(f"activation {layer['activation']!r}")
        elif kind not in ACTIVATIONS:
            missing.append(f"layer type {kind!r}")

    for section in ("stem", "block", "final"):
        for layer in raw.get(section, []):
            walk(layer)
    return missing


def load_or_skip(raw: dict, **kw):
    missing = unmerged(raw)
    if missing:
        pytest.skip("needs " + ", ".join(missing) + " (agreed spec features not in this checkout yet)")
    return from_dict(raw, **kw)


def value(v, L, l=1):
    """A field value as a number: expressions evaluated at depth L, block l."""
    return expressions.parse(v, known=None)({"L": L, "l": l}) if isinstance(v, str) else v


def layer_at(raw, path):
    """``raw["block"][0]["layers"][1]`` from ``("block", 0, "layers", 1)``."""
    out = raw
    for key in path:
        out = out[key]
    return out


def imported(name, **kw):
    return hf.from_config(DATA / name, **kw)


# ----------------------------------------------------------------------------------------------
# every family: config → spec → TOML → load → a shallow propagation


@pytest.mark.parametrize("name", CONFIGS)
def test_config_to_toml_round_trip_load_and_shallow_propagation(name):
    imp = imported(name, tokens=6)
    text = hf.to_toml(imp, name)
    assert tomllib.loads(text) == imp.spec
    assert "_why" not in json.dumps(imp.spec)
    spec = load_or_skip(tomllib.loads(text), depth=2)
    traj = kp.propagate(spec.network, spec.inputs)
    assert spec.network.depth == 2 and spec.inputs.n_tokens == 6
    assert np.all(np.isfinite(traj.kernels[-1])) and traj["q_mean"][-1] > 0


def test_gpt2_variances_by_hand():
    """GPT-2 small: normal(0, 0.02) everywhere, c_proj normal(0, 0.02/sqrt(24)); σ² = std²·fan_in."""
    imp = imported("gpt2.json")
    raw = imp.spec
    assert raw["depth"] == 12 and raw["input"] == {"kind": "equicorrelated", "tokens": 32, "q": 0.0004, "rho": 0.1,
                                                   "positional": "random", "positional_var": 0.0004}
    ln, attn = raw["block"][0]["layers"]
    assert ln == {"type": "layernorm", "eps": 1e-5}
    assert attn["heads"] == 12 and attn["causal"] is True and attn["scores"] == "standard"
    assert attn["qk_var"] == pytest.approx(0.3072 ** 2, rel=1e-15) and attn["value_var"] == 0.3072
    assert value(attn["out_var"], 12) == pytest.approx(0.02 ** 2 * 768 / (2 * 12), rel=1e-14)   # 0.0128
    assert value(attn["out_var"], 2) == pytest.approx(0.02 ** 2 * 768 / 4, rel=1e-14)           # the rule at -L 2
    ln2, up, act, down = raw["block"][1]["layers"]
    assert (up["weight_var"], up["width_factor"], act["type"]) == (0.3072, 4.0, "gelu_tanh")
    assert value(down["weight_var"], 12) == pytest.approx(0.0512, rel=1e-14)                    # 0.02²·3072/24
    assert raw["final"] == [{"type": "layernorm", "eps": 1e-5}]
    assert not any("bias_var" in json.dumps(layer) for layer in raw["block"])
    assert any("dropout" in n and "resid_pdrop = 0.1" in n for n in imp.notes)


def test_gpt2_scores_by_layer_index_and_defaults_are_noted():
    cfg = {"model_type": "gpt2", "n_layer": 3, "n_embd": 64, "n_head": 4, "scale_attn_by_inverse_layer_idx": True}
    imp = hf.from_config(cfg)
    attn = imp.spec["block"][0]["layers"][1]
    qk = (0.02 ** 2 * 64) ** 2
    assert [value(attn["qk_var"], 3, l) for l in (1, 2, 3)] == pytest.approx([qk, qk / 4, qk / 9], rel=1e-14)
    assert imp.spec["block"][1]["layers"][1]["width_factor"] == 4.0                 # n_inner absent: 4·n_embd
    assert "n_inner = 256" in imp.notes[0] and "initializer_range = 0.02" in imp.notes[0]


def test_llama_variances_by_hand():
    """Llama 2 7B: every linear normal(0, 0.02): 0.02²·4096 = 1.6384, 0.02²·11008 = 4.4032."""
    raw = imported("llama.json").spec
    assert raw["input"] == {"kind": "equicorrelated", "tokens": 32, "q": 0.0004, "rho": 0.1}
    norm, attn = raw["block"][0]["layers"]
    assert norm == {"type": "rmsnorm", "eps": 1e-5} and raw["final"] == [norm]
    assert (attn["heads"], attn["causal"], attn["scores"], attn["rope_theta"]) == (32, True, "standard", 10000.0)
    assert (attn["qk_var"], attn["value_var"], attn["out_var"]) == (2.68435456, 1.6384, 1.6384)
    mlp = raw["block"][1]["layers"][1]
    assert mlp == {"type": "gated_mlp", "activation": "silu", "gate_var": 1.6384, "up_var": 1.6384,
                   "down_var": 4.4032, "width_factor": 2.6875}


def test_mistral_and_qwen2_notes_and_values():
    mis = imported("mistral_tiny.json")
    attn = mis.spec["block"][0]["layers"][1]
    assert (attn["value_var"], attn["qk_var"], attn["rope_theta"]) == (0.1024, 0.01048576, 1e6)   # 0.02²·256
    assert any("grouped-query" in n and "2 key/value heads for 8" in n for n in mis.notes)
    qwen = imported("qwen2_tiny.json")          # std 0.03, d 128, intermediate 352
    attn, mlp = qwen.spec["block"][0]["layers"][1], qwen.spec["block"][1]["layers"][1]
    assert (attn["value_var"], attn["out_var"]) == (0.1152, 0.1152) and attn["qk_var"] == pytest.approx(0.1152 ** 2)
    assert (mlp["gate_var"], mlp["down_var"], mlp["width_factor"]) == (0.1152, 0.3168, 2.75)
    assert qwen.spec["input"]["q"] == 0.0009
    assert any("zeroed at initialisation" in n for n in qwen.notes)


def test_gpt_neox_parallel_and_sequential():
    imp = imported("gpt_neox_tiny.json")
    (block,) = imp.spec["block"]
    assert block["type"] == "parallel" and [b["beta"] for b in block["branches"]] == [1.0, 1.0]
    (ln1, attn), (ln2, up, act, down) = (b["layers"] for b in block["branches"])
    assert ln1 == ln2 == {"type": "layernorm", "eps": 1e-5} and act == {"type": "gelu"}
    assert (attn["value_var"], attn["rope_theta"], up["weight_var"], down["weight_var"]) == (0.2048, 1e4, 0.2048,
                                                                                           0.8192)
    assert any("rotary_pct = 0.25" in n for n in imp.notes)
    seq = imported("gpt_neox_sequential.json")   # rope_parameters form, std 0.05, d 96, relu
    assert [b["type"] for b in seq.spec["block"]] == ["residual", "residual"]
    attn, up = seq.spec["block"][0]["layers"][1], seq.spec["block"][1]["layers"][1]
    assert (attn["rope_theta"], attn["value_var"], up["weight_var"]) == (500.0, 0.24, 0.24)
    assert seq.spec["block"][1]["layers"][3]["weight_var"] == 0.96 and not any("rotary" in n for n in seq.notes)


def test_bert_variances_and_embedding_input_by_hand():
    raw = imported("bert.json").spec
    # word embeddings (q = 0.02², correlation 0.1) + one shared token-type vector (+0.02² everywhere):
    # q = 0.0008, rho = (0.0004·0.1 + 0.0004)/0.0008 = 0.55; learned positions +0.02² I
    assert raw["input"] == {"kind": "equicorrelated", "tokens": 32, "q": 0.0008, "rho": 0.55,
                            "positional": "random", "positional_var": 0.0004}
    assert raw["stem"] == [{"type": "layernorm", "eps": 1e-12}]
    kinds = [b["type"] for b in raw["block"]]
    assert kinds == ["residual", "layernorm", "residual", "layernorm"]         # Post-LN
    (attn,) = raw["block"][0]["layers"]
    assert (attn["causal"], attn["value_var"], attn["out_var"]) == (False, 0.3072, 0.3072)
    up, act, down = raw["block"][2]["layers"]
    assert (up["weight_var"], act["type"], down["weight_var"]) == (0.3072, "gelu", 1.2288)
    no_types = hf.from_config({**json.loads((DATA / "bert.json").read_text()), "type_vocab_size": 0}).spec
    assert (no_types["input"]["q"], no_types["input"]["rho"]) == (0.0004, 0.1)


# ----------------------------------------------------------------------------------------------
# bundled real-model examples = what the importer writes for those configs


def flat(raw, depth):
    """``{path: value}`` over every layer field (expressions evaluated at L = depth and 2, l = 1), input
    and depth; ``causal = false`` (the default) is dropped, numbers as floats."""
    out = {"depth": raw["depth"], **{f"input.{k}": v for k, v in raw["input"].items()}}

    def put(prefix, layer):
        for k, v in layer.items():
            if k in ("layers",):
                for i, sub in enumerate(v):
                    put(f"{prefix}.{k}[{i}]", sub)
            elif k == "branches":
                for i, b in enumerate(v):
                    put(f"{prefix}.branches[{i}]", b)
            elif not (k == "causal" and v is False):
                if isinstance(v, (int, float, str)) and not isinstance(v, bool) and (
                        not isinstance(v, str) or k.endswith("_var")):
                    v = (float(value(v, depth)), float(value(v, 2)))
                out[f"{prefix}.{k}"] = v

    for section in ("stem", "block", "final"):
        for i, layer in enumerate(raw.get(section, [])):
            put(f"{section}[{i}]", layer)
    return out


@pytest.mark.parametrize("example,config", [("gpt2", "gpt2.json"), ("llama", "llama.json"), ("bert", "bert.json")])
def test_bundled_example_is_what_the_importer_writes(example, config):
    written = tomllib.loads((EXAMPLES / f"{example}.toml").read_text())
    ours = hf.from_config(DATA / config).spec
    a, b = flat(written, written["depth"]), flat(ours, ours["depth"])
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert a[k] == pytest.approx(b[k], rel=1e-14), k
        else:
            assert a[k] == b[k], k


def test_torch_encoder_examples_fresh_and_cloned():
    fresh = tomllib.loads((EXAMPLES / "torch_encoder.toml").read_text())
    cloned = tomllib.loads((EXAMPLES / "torch_encoder_cloned.toml").read_text())
    assert cloned.pop("shared_weights") is True and "shared_weights" not in fresh
    # the same network, except that the shared-weights engine takes the zero-query limit of the scores
    (cattn,) = cloned["block"][0]["layers"]
    assert cattn.pop("scores") == "uniform"
    cattn.update(scores="standard", qk_var=0.25)
    assert {k: v for k, v in cloned.items() if k not in ("name", "description")} == \
        {k: v for k, v in fresh.items() if k not in ("name", "description")}
    (attn,) = fresh["block"][0]["layers"]
    assert (attn["qk_var"], attn["value_var"], attn["out_var"]) == (0.25, 0.5, pytest.approx(1 / 3, rel=1e-15))
    up, _, down = fresh["block"][2]["layers"]
    assert up["bias_var"] == pytest.approx(1 / (3 * 512), rel=1e-15)
    assert down["bias_var"] == pytest.approx(1 / (3 * 2048), rel=1e-15)
    spec = kp.loads((EXAMPLES / "torch_encoder.toml").read_text(), depth=2)
    traj = kp.propagate(spec.network, spec.inputs)
    assert traj["q_mean"][-1] == pytest.approx(1.0, rel=1e-4)          # Post-LN: unit norm after each block
    load_or_skip(tomllib.loads((EXAMPLES / "torch_encoder_cloned.toml").read_text()), depth=2)


@pytest.mark.parametrize("example", ["gpt2", "llama", "bert", "torch_encoder", "torch_encoder_cloned"])
def test_bundled_examples_load_once_their_features_exist(example):
    raw = tomllib.loads((EXAMPLES / f"{example}.toml").read_text())
    spec = load_or_skip(raw)
    assert spec.network.name and spec.network.depth == raw["depth"]


# ----------------------------------------------------------------------------------------------
# errors


def test_an_unknown_model_type_names_it():
    with pytest.raises(SpecError) as info:
        hf.from_config(DATA / "t5_unknown.json")
    assert info.value.field == "model_type" and info.value.value == "t5" and "gpt_neox" in info.value.allowed
    with pytest.raises(SpecError) as info:
        hf.from_config({"n_layer": 2})
    assert info.value.field == "model_type" and info.value.value is None


@pytest.mark.parametrize("name,field", [
    ("gpt2.json", "n_layer"), ("gpt2.json", "n_embd"), ("gpt2.json", "n_head"),
    ("llama.json", "hidden_size"), ("llama.json", "intermediate_size"), ("llama.json", "num_hidden_layers"),
    ("llama.json", "num_attention_heads"), ("gpt_neox_tiny.json", "intermediate_size"),
    ("bert.json", "num_hidden_layers"), ("qwen2_tiny.json", "hidden_size"),
])
def test_a_missing_required_field_names_it(name, field):
    cfg = json.loads((DATA / name).read_text())
    del cfg[field]
    with pytest.raises(SpecError) as info:
        hf.from_config(cfg)
    assert info.value.field == field and "missing" in info.value.allowed


@pytest.mark.parametrize("name,field,bad,words", [
    ("gpt2.json", "n_layer", "12", "whole number"),
    ("gpt2.json", "initializer_range", -0.02, "finite number > 0"),
    ("gpt2.json", "scale_attn_weights", False, "no infinite-width limit"),
    ("gpt2.json", "n_head", 7, "must divide n_embd"),
    ("llama.json", "hidden_act", "quick_gelu", "gelu_new"),
    ("llama.json", "rope_theta", "1e4", "finite number"),
    ("llama.json", "num_key_value_heads", 5, "must divide"),
    ("gpt_neox_tiny.json", "use_parallel_residual", "yes", "true or false"),
    ("gpt_neox_tiny.json", "rotary_pct", 1.5, "(0, 1]"),
    ("bert.json", "position_embedding_type", "relative_key", "absolute"),
])
def test_a_wrong_field_names_it(name, field, bad, words):
    cfg = json.loads((DATA / name).read_text())
    cfg[field] = bad
    with pytest.raises(SpecError) as info:
        hf.from_config(cfg)
    assert info.value.field == field and info.value.value == bad and words in info.value.allowed


def test_sliding_window_shorter_than_the_input_is_refused_only_where_it_applies():
    mistral = json.loads((DATA / "mistral_tiny.json").read_text()) | {"sliding_window": 16}
    with pytest.raises(SpecError) as info:
        hf.from_config(mistral, tokens=17)
    assert info.value.field == "sliding_window" and info.value.value == 16
    assert hf.from_config(mistral, tokens=16).spec["input"]["tokens"] == 16
    hf.from_config(DATA / "qwen2_tiny.json")      # window 8 < 32 tokens, but use_sliding_window is false


def test_unreadable_config_and_bad_input_knobs(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    for path in (bad, tmp_path / "absent.json"):
        with pytest.raises(SpecError) as info:
            hf.from_config(path)
        assert info.value.field == "config"
    with pytest.raises(SpecError) as info:
        hf.from_config(DATA / "gpt2.json", tokens=0)
    assert info.value.field == "input.tokens"
    with pytest.raises(SpecError) as info:
        hf.from_config(DATA / "gpt2.json", rho=1.5)
    assert info.value.field == "input.rho"


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_import_config_writes_the_spec_and_run_config_runs_it(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    runner = CliRunner()
    out = tmp_path / "bert.toml"
    res = runner.invoke(app, ["import-config", str(DATA / "bert.json"), "-o", str(out), "--tokens", "8"])
    assert res.exit_code == 0, res.output
    assert tomllib.loads(out.read_text()) == hf.from_config(DATA / "bert.json", tokens=8).spec
    assert "# note: dropout" in out.read_text()
    res = runner.invoke(app, ["import-config", str(DATA / "llama.json")])        # no -o: the TOML on stdout
    assert res.exit_code == 0 and tomllib.loads(res.stdout) == hf.from_config(DATA / "llama.json").spec
    res = runner.invoke(app, ["run", "--config", str(DATA / "bert.json"), "-L", "2", "--tokens", "6"])
    assert res.exit_code == 0 and "BERT" in res.stdout and "T=6" in res.stdout
    res = runner.invoke(app, ["run", "pre_ln", "--config", str(DATA / "bert.json")])
    assert res.exit_code == 2 and "--config" in res.output


@pytest.mark.parametrize("name,args,words", [
    ("t5_unknown.json", [], "model_type = 't5'"),
    ("gpt2_no_n_embd.json", [], "n_embd = None: is missing"),
    ("gpt2.json", ["--tokens", "0"], "input.tokens"),
])
def test_cli_import_config_exit_2_leaves_no_file(tmp_path, name, args, words):
    from typer.testing import CliRunner

    from cli import app
    out = tmp_path / "model.toml"
    res = CliRunner().invoke(app, ["import-config", str(DATA / name), "-o", str(out), *args])
    assert res.exit_code == 2 and words in " ".join(res.output.split())
    assert list(tmp_path.iterdir()) == []
    res = CliRunner().invoke(app, ["import-config", str(DATA / "gpt2.json"), "-o", str(tmp_path / "model.json")])
    assert res.exit_code == 2 and "--output" in res.output and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# padded token inputs


def test_pad_id_drops_padding_exactly():
    x = I.tokens([[7, 7, 3, 0, 0], [0, 3, 9]], q=2.0, rho=0.25, pad_id=0)
    assert x.segments == (3, 2) and x.token_ids == ((7, 7, 3), (3, 9))
    same = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(x.sigma, 2.0 * np.where(same == 1, 1.0, 0.25))
    assert "3 padded positions dropped" in x.description


def test_attention_mask_left_and_right_padding_give_the_same_input():
    right = I.tokens([[5, 6, 0, 0], [1, 2, 3, 4]], attention_mask=[[1, 1, 0, 0], [1, 1, 1, 1]])
    left = I.tokens([[0, 0, 5, 6], [1, 2, 3, 4]], attention_mask=[[0, 0, 1, 1], [1, 1, 1, 1]])
    assert right.token_ids == left.token_ids == ((5, 6), (1, 2, 3, 4))
    np.testing.assert_array_equal(right.sigma, left.sigma)
    pos = left.with_positional("random", 0.5)       # positions restart at 0 in each sequence
    assert pos.sigma[0, 2] == 0.5 and pos.sigma[1, 3] == 0.5 and pos.sigma[0, 3] == 0.0


@pytest.mark.parametrize("kw,field,words", [
    ({"pad_id": 0, "ids": [[1, 2], [0, 0]]}, "input.ids", "no tokens left"),
    ({"attention_mask": [[1, 1], [0, 0]]}, "input.ids", "no tokens left"),
    ({"attention_mask": [[1, 1, 1], [1, 1]]}, "input.attention_mask", "shape of ids"),
    ({"attention_mask": [[1, 2], [1, 1]]}, "input.attention_mask", "1 (token) or 0"),
    ({"pad_id": 1.5}, "input.pad_id", "whole number"),
])
def test_padding_errors_name_the_field(kw, field, words):
    kw = dict(kw)
    ids = kw.pop("ids", [[1, 2], [3, 4]])
    with pytest.raises(SpecError) as info:
        I.tokens(ids, **kw)
    assert info.value.field == field and words in info.value.allowed


def test_padding_in_a_spec_file():
    text = """
depth = 1
[input]
kind = "tokens"
ids = [[464, 3290, 318, 50256, 50256], [40, 588, 340, 13, 50256]]
attention_mask = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
positional = "random"
positional_var = 0.5
[[block]]
type = "layernorm"
"""
    x = kp.loads(text).inputs
    assert x.segments == (3, 4) and x.token_ids == ((464, 3290, 318), (40, 588, 340, 13))
    assert kp.loads(text.replace("attention_mask = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]", "pad_id = 50256")
                    ).inputs.token_ids == x.token_ids
    with pytest.raises(SpecError) as info:
        kp.loads(text.replace("pad_id", "padding").replace("attention_mask", "mask"))
    assert info.value.field == "input.mask"


# ----------------------------------------------------------------------------------------------
# docs/inits.md: every row of the framework → kernelprop table, checked by sampling or an identity


def sampled_sigma2(w, fan_in):
    """σ̂² = fan_in · mean(w²) and its standard error."""
    sq = np.asarray(w, dtype=np.float64).ravel() ** 2
    return fan_in * sq.mean(), fan_in * sq.std(ddof=1) / math.sqrt(sq.size)


def assert_within(estimate, se, expected, k=5.0):
    assert abs(estimate - expected) <= k * se, f"{estimate:.6g} ± {se:.2g} vs {expected:.6g}"


def kaiming_uniform(rng, fan_out, fan_in, a):
    """torch.nn.init.kaiming_uniform_: gain sqrt(2/(1 + a²)), bound gain·sqrt(3/fan_in)."""
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, (fan_out, fan_in))


def xavier_uniform(rng, fan_out, fan_in, gain=1.0):
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, (fan_out, fan_in))


def row_torch_linear(rng):
    assert_within(*sampled_sigma2(kaiming_uniform(rng, 512, 512, math.sqrt(5)), 512), 1 / 3)


def row_torch_linear_bias(rng):
    fan_in = 512
    b = rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), 200_000)
    est, se = sampled_sigma2(b, 1)
    assert_within(est, se, 1 / (3 * fan_in))


def row_xavier_uniform(rng):
    assert_within(*sampled_sigma2(xavier_uniform(rng, 2048, 512), 512), 0.4)      # d → 4d
    assert_within(*sampled_sigma2(xavier_uniform(rng, 384, 384, gain=1.5), 384), 1.5 ** 2)


def row_xavier_normal(rng):
    w = rng.normal(0.0, math.sqrt(2.0 / (512 + 2048)), (2048, 512))
    assert_within(*sampled_sigma2(w, 512), 0.4)


def row_torch_mha_in_proj(rng):
    d = 512
    w = xavier_uniform(rng, 3 * d, d)               # the packed in_proj_weight, 3d × d
    parts = [sampled_sigma2(w[k * d:(k + 1) * d], d) for k in range(3)]
    for est, se in parts:
        assert_within(est, se, 0.5)
    assert parts[0][0] * parts[1][0] == pytest.approx(0.25, rel=0.02)   # qk_var = σ_q² σ_k²
    assert_within(*sampled_sigma2(kaiming_uniform(rng, d, d, math.sqrt(5)), d), 1 / 3)   # out_proj


def row_kaiming_normal(rng):
    assert_within(*sampled_sigma2(rng.normal(0, math.sqrt(2 / 512), (512, 512)), 512), 2.0)


def row_normal_std(rng):
    w = rng.normal(0, 0.02, (3072, 768))
    assert_within(*sampled_sigma2(w, 768), 0.3072)
    assert hf.from_config(DATA / "gpt2.json").spec["block"][1]["layers"][1]["weight_var"] == 0.3072


def row_gpt2_c_proj(rng):
    w = rng.normal(0, 0.02 / math.sqrt(2 * 12), (768, 3072))          # MLP c_proj, fan-in 3072
    assert_within(*sampled_sigma2(w, 3072), 0.0512)
    down = hf.from_config(DATA / "gpt2.json").spec["block"][1]["layers"][3]["weight_var"]
    assert value(down, 12) == pytest.approx(0.0512, rel=1e-14)


def row_truncated_normal(rng):
    z = rng.normal(size=600_000)
    z = z[np.abs(z) < 2.0]                          # cut at ±2 stddev (stddev 1 here)
    est, se = sampled_sigma2(z, 1)
    factor = 1 - 4 * normal_dist.pdf(2.0) / (2 * normal_dist.cdf(2.0) - 1)
    assert factor == pytest.approx(0.77374, abs=5e-6)
    assert_within(est, se, factor)
    w = rng.normal(0, 0.02, 400_000)                # timm: cut at ±2 absolute = ±100 std: nothing is cut
    assert np.all(np.abs(w) < 2.0)


def row_bias_zero(rng):
    for name in CONFIGS:
        assert "bias_var" not in json.dumps(imported(name).spec), name
    torch_attn = tomllib.loads((EXAMPLES / "torch_encoder.toml").read_text())["block"][0]["layers"][0]
    assert "bias_var" not in torch_attn and "value_bias_var" not in torch_attn


def row_norm(rng):
    """ε enters as in the module: numpy LayerNorm of wide Gaussian tokens vs the kernel map."""
    d, eps = 4096, 0.5
    sigma = np.array([[2.0, 0.6], [0.6, 1.0]])
    x = np.linalg.cholesky(sigma) @ rng.normal(size=(2, d))
    xc = x - x.mean(1, keepdims=True)
    y = xc / np.sqrt((xc ** 2).mean(1, keepdims=True) + eps)         # torch LayerNorm, weight 1, bias 0
    spec = kp.loads('[input]\nkind = "gram"\nmatrix = [[2.0, 0.6], [0.6, 1.0]]\n'
                    f'[[block]]\ntype = "layernorm"\neps = {eps}\n')
    theory = kp.propagate(spec.network, spec.inputs).kernels[-1]
    np.testing.assert_allclose(y @ y.T / d, theory, atol=0.05)
    assert imported("bert.json").spec["stem"][0] == {"type": "layernorm", "eps": 1e-12}   # gain left at 1


def row_embedding(rng):
    std, vocab, d = 0.02, 64, 4096
    table = rng.normal(0, std, (vocab, d))
    gram = table @ table.T / d
    diag, off = np.diag(gram), gram[~np.eye(vocab, dtype=bool)]
    assert_within(diag.mean(), diag.std(ddof=1) / math.sqrt(vocab), std ** 2)          # q = std²
    assert_within(off.mean(), off.std(ddof=1) / math.sqrt(off.size), 0.0)              # distinct: rho = 0
    assert hf.from_config(DATA / "llama.json").spec["input"]["q"] == std ** 2


def row_learned_positions(rng):
    std, t, d, seeds = 0.02, 5, 256, 400
    word = rng.normal(0, std, (seeds, 1, d))       # one repeated token
    pos = rng.normal(0, std, (seeds, t, d))        # wpe rows 0..t-1
    x = word + pos
    grams = x @ np.swapaxes(x, 1, 2) / d
    theory = I.equicorrelated(t, std ** 2, 1.0).with_positional("random", std ** 2).sigma
    se = grams.std(0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(grams.mean(0) - theory) <= 5 * se)


def row_sinusoidal_positions(rng):
    d, t = 64, 9
    p, k = np.arange(t)[:, None], np.arange(d // 2)[None, :]
    pe = np.zeros((t, d))
    pe[:, 0::2] = np.sin(p / 10000 ** (2 * k / d))
    pe[:, 1::2] = np.cos(p / 10000 ** (2 * k / d))
    x = I.identity(t, 1.0).with_positional("sinusoidal", 0.5, d)
    np.testing.assert_allclose(pe @ pe.T / d, x.sigma - np.eye(t), rtol=0, atol=1e-13)


def row_token_types(rng):
    std, t, d, seeds, rho = 0.02, 4, 256, 400, 0.1
    shared = rng.normal(0, std, (seeds, 1, d))            # a corpus-level common direction: correlation rho
    own = rng.normal(0, std, (seeds, t, d))
    words = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
    x = words + rng.normal(0, std, (seeds, 1, d))         # + token_type_embeddings[0] on every token
    grams = x @ np.swapaxes(x, 1, 2) / d
    cfg = {"model_type": "bert", "hidden_size": d, "intermediate_size": 4 * d, "num_hidden_layers": 1,
           "num_attention_heads": 4, "max_position_embeddings": 8}
    inp = hf.from_config(cfg, tokens=t, rho=rho).spec["input"]
    theory = I.equicorrelated(t, inp["q"], inp["rho"]).sigma
    se = grams.std(0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(grams.mean(0) - theory) <= 5 * se)


def _scores(rng, x, dk, trials, scale, tied=False, sq=1.0, sk=1.0):
    """Scores x_i W_Q (x_j W_K)ᵀ · scale over independent draws of W (entries N(0, σ²/d))."""
    d = x.shape[1]
    wq = rng.normal(0, math.sqrt(sq / d), (trials, d, dk))
    wk = wq if tied else rng.normal(0, math.sqrt(sk / d), (trials, d, dk))
    return (x @ wq) @ np.swapaxes(x @ wk, 1, 2) * scale


def _two_tokens(rng, d):
    x = rng.normal(size=(2, d))
    return x, x @ x.T / d


def row_qk_standard(rng):
    x, s = _two_tokens(rng, 32)
    sq, sk, dk = 0.7, 1.8, 8
    z = _scores(rng, x, dk, 6000, 1 / math.sqrt(dk), sq=sq, sk=sk)
    for (i, j), (k, l) in [((0, 1), (0, 1)), ((0, 0), (0, 0)), ((0, 1), (1, 0)), ((0, 0), (1, 1))]:
        prod = z[:, i, j] * z[:, k, l]
        assert_within(prod.mean(), prod.std(ddof=1) / math.sqrt(len(prod)), sq * sk * s[i, k] * s[j, l])


def row_qk_tied(rng):
    x, s = _two_tokens(rng, 32)
    z = _scores(rng, x, 64, 3000, 1 / 64, tied=True, sq=0.7)
    se = z.std(0, ddof=1) / math.sqrt(len(z))
    assert np.all(np.abs(z.mean(0) - 0.7 * s) <= 5 * se)


def row_qk_uniform(rng):
    x, s = _two_tokens(rng, 32)
    for dk in (4, 64):          # independent Q, K at 1/d_k: Var S_01 = σ_q²σ_k² Σ00 Σ11 / d_k → 0
        z = _scores(rng, x, dk, 3000, 1 / dk)[:, 0, 1] ** 2
        assert_within(z.mean(), z.std(ddof=1) / math.sqrt(len(z)), s[0, 0] * s[1, 1] / dk)


def _attention_grams(rng, x, heads, kv_heads, seeds):
    """Mean output gram of softmax attention with independent Q, K at 1/sqrt(d_h) (finite width)."""
    t, d = x.shape
    dh, group = d // heads, heads // kv_heads
    wq = rng.normal(0, math.sqrt(1 / d), (seeds, heads, d, dh))
    wk = rng.normal(0, math.sqrt(1 / d), (seeds, kv_heads, d, dh))
    wv = rng.normal(0, math.sqrt(1 / d), (seeds, kv_heads, d, dh))
    wo = rng.normal(0, math.sqrt(1 / d), (seeds, heads * dh, d))
    q = np.einsum("td,shdk->shtk", x, wq)
    k = np.repeat(np.einsum("td,shdk->shtk", x, wk), group, axis=1)
    v = np.repeat(np.einsum("td,shdk->shtk", x, wv), group, axis=1)
    a = q @ np.swapaxes(k, 2, 3) / math.sqrt(dh)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.swapaxes(a @ v, 1, 2).reshape(seeds, t, heads * dh) @ wo
    return o @ np.swapaxes(o, 1, 2) / d


def row_gqa(rng):
    x = rng.normal(size=(4, 32))
    mha = _attention_grams(rng, x, 4, 4, 3000)
    gqa = _attention_grams(rng, x, 4, 1, 3000)
    se = np.sqrt(mha.var(0, ddof=1) / len(mha) + gqa.var(0, ddof=1) / len(gqa))
    assert np.all(np.abs(mha.mean(0) - gqa.mean(0)) <= 5 * se)
    note = " ".join(imported("mistral_tiny.json").notes)
    assert "grouped-query" in note and "unchanged" in note


def _phi(name):
    if name not in ACTIVATIONS:
        pytest.skip(f"activation {name!r} is not registered in this checkout yet")
    return ACTIVATIONS[name].phi


def row_act_gelu(rng):
    x = np.linspace(-8, 8, 2001)
    np.testing.assert_allclose(_phi("gelu")(x), 0.5 * x * erfc(-x / math.sqrt(2)), rtol=1e-13, atol=1e-300)
    assert hf.ACTIVATIONS["gelu"] == "gelu"


def row_act_gelu_tanh(rng):
    assert {hf.ACTIVATIONS[k] for k in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")} == {"gelu_tanh"}
    x = np.linspace(-8, 8, 2001)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(_phi("gelu_tanh")(x), ref, rtol=1e-13, atol=1e-300)


def row_act_silu(rng):
    x = np.linspace(-30, 30, 2001)
    np.testing.assert_allclose(_phi("silu")(x), x / (1 + np.exp(-x)), rtol=1e-13, atol=1e-300)
    assert hf.ACTIVATIONS["silu"] == hf.ACTIVATIONS["swish"] == "silu"


ROWS = {
    "torch-linear": row_torch_linear, "torch-linear-bias": row_torch_linear_bias,
    "xavier-uniform": row_xavier_uniform, "xavier-normal": row_xavier_normal,
    "torch-mha-in-proj": row_torch_mha_in_proj, "kaiming-normal": row_kaiming_normal,
    "normal-std": row_normal_std, "gpt2-c-proj": row_gpt2_c_proj, "truncated-normal": row_truncated_normal,
    "bias-zero": row_bias_zero, "norm": row_norm, "embedding": row_embedding,
    "learned-positions": row_learned_positions, "sinusoidal-positions": row_sinusoidal_positions,
    "token-types": row_token_types, "qk-standard": row_qk_standard, "qk-tied": row_qk_tied,
    "qk-uniform": row_qk_uniform, "gqa": row_gqa, "act-gelu": row_act_gelu,
    "act-gelu-tanh": row_act_gelu_tanh, "act-silu": row_act_silu,
}


def doc_rows():
    text = (ROOT / "docs" / "inits.md").read_text()
    table = text.split("## From your framework to kernelprop", 1)[1].split("\n### ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)]


def test_every_row_of_the_inits_table_has_a_check():
    rows = doc_rows()
    assert len(rows) == len(set(rows)) and set(rows) == set(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_inits_table_row(row):
    ROWS[row](np.random.default_rng(20240613 + sorted(ROWS).index(row)))
