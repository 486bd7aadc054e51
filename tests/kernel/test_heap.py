"""kernelprop.kernel.heap: freed T×T temporaries are reused without page faults (counted, not timed)."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import numpy as np
from kernelprop.kernel import heap
print(heap.retain() if sys.argv[1] == "on" else "off")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = np.ones((256, 256))                       # 512 KiB: above glibc's default mmap threshold
for _ in range(5):
    y = x * 2.0; z = y + x; w = z * y; del y, z, w
f0 = faults()
for _ in range(50):                           # 150 temporaries of 128 pages each
    y = x * 2.0; z = y + x; w = z * y; del y, z, w
print(faults() - f0)
"""


def _run(mode, **env):
    import os
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "KERNELPROP_HEAP"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=full, check=True)
    state, faults = out.stdout.split()
    return state, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_heap_reuses_freed_temporaries_without_faulting_them_in_again():
    state, faults = _run("on")
    if state == "unavailable":
        pytest.skip("not glibc")
    assert state == "retained"
    _, baseline = _run("off")
    # glibc's defaults fault every page of most 512 KiB temporaries (~17 600 faults here); retained: a handful
    assert baseline > 5000
    assert faults < 200


@pytest.mark.parametrize("env", [{"KERNELPROP_HEAP": "system"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}])
def test_an_environment_that_tunes_malloc_is_left_alone(env):
    state, _ = _run("on", **env)
    assert state == "system"


def test_a_misspelt_setting_is_refused_by_name(monkeypatch):
    from kernelprop.errors import SpecError
    from kernelprop.kernel import heap
    monkeypatch.setenv("KERNELPROP_HEAP", "sytem")
    monkeypatch.setattr(heap, "_state", None)
    with pytest.raises(SpecError) as info:
        heap.retain()
    assert info.value.field == "KERNELPROP_HEAP" and "system" in info.value.allowed
    assert heap._state is None                # nothing was set


def test_the_command_line_exits_2_naming_the_variable(monkeypatch):
    from typer.testing import CliRunner

    from kernelprop.cli import app
    from kernelprop.kernel import heap
    monkeypatch.setattr(heap, "_state", None)
    res = CliRunner().invoke(app, ["run", "vanilla", "-L", "2"], env={"KERNELPROP_HEAP": "sytem"})
    assert res.exit_code == 2 and "KERNELPROP_HEAP" in res.stderr
