"""Records are data: one walk decides where every interpreter records, and each record carries its
section, block, part, layer path and kind. The backward pass reuses the forward's own rules."""

from dataclasses import dataclass

import numpy as np

import kernelprop as kp
from kernelprop import inputs as I
from kernelprop import montecarlo as mc
from kernelprop.layers import Activation, Dense, Layer, LayerNorm, Residual, Scale
from kernelprop.network.walk import Record

X = I.equicorrelated(4, 1.0, 0.3)
NET = kp.Network(stem=[Dense(), Activation("relu")], block=[Residual(LayerNorm(), Dense()), Scale(0.9)],
                 final=[LayerNorm(), Dense()], depth=3)


def test_sublayer_records_split_the_stem_and_the_final_layers():
    t = kp.propagate(NET, X, record="sublayers", every=2)
    assert t.labels == ["input", "stem · 0:dense", "stem", "block 2 · 0:residual", "block 2",
                        "block 3 · 0:residual", "block 3", "final · 0:layernorm", "final"]
    assert t.records[3] == Record("block 2 · 0:residual", "block", 2, 0, "block 2/0:residual", "residual")
    assert [t.labels[i] for i in t.depth_records()] == ["input", "block 2", "block 3"]
    assert t.where(section="final") == [7, 8]
    blocks = kp.propagate(NET, X, every=2)
    assert blocks.labels == ["input", "stem", "block 2", "block 3", "final"]
    # the records of the coarser run are the same numbers
    for r, label in enumerate(blocks.labels):
        np.testing.assert_array_equal(blocks.kernels[r], t.kernels[t.labels.index(label)])


def test_every_interpreter_records_at_the_same_places():
    t = kp.propagate(NET, X, record="sublayers", every=2)
    sim = mc.simulate(NET, X, 16, 2, record="sublayers", every=2)
    assert sim.records == t.records
    g = kp.backpropagate(NET, X, every=2)
    gs = mc.simulate_gradients(NET, X, 16, 2, every=2)
    assert g.labels == gs.labels == ["input", "stem", "block 2", "block 3", "final"]
    assert g.records == gs.records and g.forward.records == kp.propagate(NET, X, every=2).records


@dataclass(frozen=True, eq=False)
class _Counted(Layer):
    """Scale by 1 and count the forward maps (a probe for how often the forward pass runs)."""

    kind = "counted"
    calls = [0]

    def kernel_map(self, s, ctx):
        self.calls[0] += 1
        return s, lambda pi, grads: pi


def test_backpropagate_runs_the_forward_pass_once():
    net = kp.Network(block=[Dense(), Activation("relu"), _Counted(), Dense(weight_var=2.0)], depth=5)
    _Counted.calls[0] = 0
    g = kp.backpropagate(net, X)
    assert _Counted.calls[0] == 5
    np.testing.assert_array_equal(g.forward.kernels, kp.propagate(net, X).kernels)
