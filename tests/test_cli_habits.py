"""The command line's conveniences: --version, shell completion, progress bars only on a terminal's
stderr, the README's symbolic example, `examples --show`, one option name per concept."""

import functools
import io
import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib
from rich.console import Console
from typer.testing import CliRunner

import kernelprop
from kernelprop.cli import app, core, options
from kernelprop.models import examples

runner = CliRunner()
README = Path(__file__).parents[1] / "README.md"
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_version_prints_the_project_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert res.stdout == f"kernelprop {declared}\n"
    assert kernelprop.__version__ == declared


def test_show_completion_prints_a_bash_script(monkeypatch):
    # typer detects the shell from the process tree (shellingham), which fails in a detached job: fix it to bash
    import typer.completion
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    res = runner.invoke(app, ["--show-completion", "bash"], prog_name="kernelprop")
    assert res.exit_code == 0, res.output
    assert "complete" in res.stdout and "_KERNELPROP_COMPLETE" in res.stdout and "COMP_WORDS" in res.stdout


def test_completion_options_are_listed():
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in res.stdout and "--show-completion" in res.stdout and "--version" in res.stdout


# ---- progress: a bar on a terminal's stderr, nothing in pipes -----------------------------------------------

SHORT = {  # every command that takes a progress callback, at a size that runs in a second or two
    "run": ["run", "vanilla", "-L", "3"],
    "gradients": ["gradients", "vanilla", "-L", "3"],
    "moments": ["moments", "vanilla", "-L", "3"],
    "simulate": ["simulate", "vanilla", "-L", "3", "-d", "64", "-S", "2", "--no-dong"],
    "check": ["check", "vanilla", "-L", "2", "-d", "80", "-S", "4"],
    "sweep": ["sweep", "relu_mlp", "--param", "L=1:3:3", "--no-figure"],
    "compare": ["compare", "noci", "sas", "-L", "3"],
}
HIDE_CURSOR = "\x1b[?25l"   # a live display starts with it
LABELS = {"run": "propagating", "gradients": "backpropagating", "moments": "backpropagating",
          "simulate": "simulating", "check": "checking", "sweep": "sweeping",
          "compare": "comparing"}


@pytest.mark.parametrize("name", sorted(SHORT))
def test_no_progress_bar_when_stderr_is_not_a_terminal(name):
    res = runner.invoke(app, SHORT[name])
    assert res.exit_code in (0, 3), res.output
    for stream in (res.stdout, res.stderr):
        assert "\x1b" not in stream and "%" not in stream and LABELS[name] not in stream


@pytest.mark.parametrize("name", sorted(SHORT))
def test_progress_bar_on_a_terminal_at_small_depth(name, monkeypatch):
    """Depth 2 or 3: the bar is not reserved for long runs; it goes to stderr only, stdout keeps the table."""
    monkeypatch.setattr(core, "Console", functools.partial(Console, force_terminal=True, force_interactive=True))
    res = runner.invoke(app, SHORT[name])
    assert res.exit_code in (0, 3), res.output
    assert LABELS[name] in res.stderr and "100%" in res.stderr and HIDE_CURSOR in res.stderr
    assert LABELS[name] not in res.stdout and HIDE_CURSOR not in res.stdout


def test_progress_bar_reaches_the_total_the_library_reports(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(core, "err", Console(file=buf, force_terminal=True, force_interactive=True, width=80))

    def job(callback):
        for done in range(7):
            callback(done, 6)
        return "result"

    assert core._with_progress(job, 3, "simulating") == "result"
    text = buf.getvalue()
    assert "simulating" in text and "100%" in text


# ---- symbolic: the README's example works as written ---------------------------------------------------------

def _readme_commands(command):
    """Every command line in README.md starting with `kernelprop COMMAND ` and a lower-case spec name."""
    found = re.findall(rf"`(kernelprop {command} [a-z_]+[^`|]*)`", README.read_text())
    return [shlex.split(c)[1:] for c in found]


def test_readme_symbolic_example_runs_as_written():
    commands = _readme_commands("symbolic")
    assert ["symbolic", "pre_ln"] in commands
    for args in commands:
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0, (args, res.output)
        assert "block l, layer by layer" in res.stdout


def test_symbolic_picks_the_explicit_mode_for_causal_attention():
    res = runner.invoke(app, ["symbolic", "pre_ln"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "explicit kernel of 3 tokens" in res.stdout
    assert "note: causal attention does not preserve equicorrelation" in res.stderr
    assert "T = 3 tokens (the spec has 32)" in res.stderr and "--explicit T" in res.stderr
    # the (q, ρ) mode is unchanged where it applies: no note, no token matrix
    res = runner.invoke(app, ["symbolic", "relu_mlp"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "note:" not in res.stderr and "S_1_2" not in res.stdout


def test_symbolic_with_explicit_tokens_is_not_second_guessed():
    res = runner.invoke(app, ["symbolic", "pre_ln", "--explicit", "2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "explicit kernel of 2 tokens" in res.stdout and "note:" not in res.stderr


def test_symbolic_other_refusals_still_exit_2(tmp_path):
    """A refusal that is not about causal attention is not retried in the explicit mode."""
    spec = tmp_path / "bidir_std.toml"
    spec.write_text('depth = 2\n[input]\nkind = "equicorrelated"\ntokens = 4\nq = 1.0\nrho = 0.2\n'
                    '[[block]]\ntype = "attention"\ncausal = false\nscores = "standard"\n')
    res = runner.invoke(app, ["symbolic", str(spec)])
    assert res.exit_code == 2 and "note:" not in res.stderr and "not supported" in res.stderr


# ---- examples --show -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pre_ln", "llama"])
def test_examples_show_prints_the_bundled_file_and_where_it_lives(name, tmp_path):
    res = runner.invoke(app, ["examples", "--show", name], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    path = examples()[name]
    assert res.stdout == path.read_text(encoding="utf-8")
    assert str(path) in res.stderr
    # what it prints is a spec a user can start from: written to a file, it loads and runs
    copy = tmp_path / "mine.toml"
    copy.write_text(res.stdout, encoding="utf-8")
    ran = runner.invoke(app, ["run", str(copy), "-L", "2"])
    assert ran.exit_code == 0, ran.output


def test_examples_show_unknown_name_lists_the_bundled_ones():
    res = runner.invoke(app, ["examples", "--show", "pre_lm"])
    assert res.exit_code == 2 and res.stdout == ""
    assert "--show" in res.stderr and "pre_ln" in res.stderr.replace("\n", " ")


# ---- one option name per concept -----------------------------------------------------------------------------

PRESET_COMMANDS = ["run", "gradients", "moments", "compare", "sweep", "simulate", "check"]


@pytest.mark.parametrize("command", PRESET_COMMANDS)
def test_preset_scores_has_one_name_in_every_command(command):
    text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
    assert "--preset-scores" in text
    # --scores is listed only where it sets the simulation's scores
    assert ("--scores " in text) == (command in ("simulate", "check"))


def test_former_scores_name_is_a_hidden_alias(tmp_path):
    def csv(args):
        out = tmp_path / "r.csv"
        res = runner.invoke(app, ["run", "--preset", "noci", "-L", "3", "-o", str(out), *args])
        assert res.exit_code == 0, res.output
        return out.read_text()

    tied, uniform = csv(["--preset-scores", "tied"]), csv([])
    assert tied != uniform                       # the knob changes the result ...
    assert csv(["--scores", "tied"]) == tied     # ... and the former name sets the same knob
    res = runner.invoke(app, ["run", "--preset", "noci", "--scores", "tied", "--preset-scores", "standard"])
    assert res.exit_code == 2 and "former name of --preset-scores" in res.output


def test_measure_has_the_short_flag_everywhere():
    for command in ("compare", "sweep", "plot"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        assert re.search(r"--measure\s+-m", text), command
    res = runner.invoke(app, ["compare", "noci", "sas", "-L", "3", "-m", "cos_mean"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("words,expected", [
    ("kernelprop sim", ["simulate"]),
    ("kernelprop run pre", ["pre_ln"]),
    ("kernelprop run --preset no", ["noci"]),
    ("kernelprop compare sa", ["sas", "sas_p"]),
    ("kernelprop examples --show ll", ["llama"]),
])
def test_completion_offers_commands_examples_and_presets(words, expected):
    env = {"_KERNELPROP_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    res = runner.invoke(app, [], prog_name="kernelprop", env=env)
    assert res.exit_code == 0
    assert res.stdout.split() == expected


def test_spec_completion_offers_toml_files_too(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text("")
    (tmp_path / "mine.json").write_text("")
    (tmp_path / "pre_ln_copy.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert options._complete_spec("mi") == ["mine.toml"]
    assert options._complete_spec("pre") == ["pre_ln", "pre_ln_copy.toml"]
    assert options._complete_spec(str(tmp_path / "m")) == [str(tmp_path / "mine.toml")]
    assert options._complete_spec("[") == []


# ---- notebooks say how long they take and how to run them fast -----------------------------------------------

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_states_its_run_time_and_the_fast_switch(path):
    import json
    first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    assert first["cell_type"] == "markdown"
    m = re.search(r"Run time: about (\d+) s at full settings on a 2-core machine; KERNELPROP_FAST=1 runs a smaller "
                  r"version in about (\d+) s", "".join(first["source"]).replace("\n", " "))
    assert m, "the first markdown cell states the run time"
    full, fast = int(m[1]), int(m[2])
    assert full <= 300 and fast <= full


def test_examples_listing_says_where_they_live_and_how_to_copy_one():
    res = runner.invoke(app, ["examples"])
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names == list(examples()) and "pre_ln" in names
    assert "--show NAME" in res.stderr and str(examples()["pre_ln"].parent) in res.stderr
