"""Every command line follows `xmag_jax.cli`: `--help` lists each flag with its default (exit 0), a bad flag is one
line on stderr and exit 2, and all commands import together (each has its own absl FlagValues). No JAX compile."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from xmag_jax import cli, errors

REPO = Path(__file__).resolve().parents[1]

# (module, subcommand words before the flags, the module holding the parser, its Command attribute)
COMMANDS = [
    ("xmag_jax.train", [], "xmag_jax.train", "COMMAND"),
    ("xmag_jax.aot.cli", [], "xmag_jax.aot.cli", "COMMAND"),
    ("xmag_jax.finetune.__main__", [], "xmag_jax.finetune.__main__", "COMMAND"),
    ("xmag_jax.finetune.aot", [], "xmag_jax.finetune.aot", "COMMAND"),
    ("xmag_jax.teacher_cache.__main__", [], "xmag_jax.teacher_cache.__main__", "COMMAND"),
    ("xmag_jax.survival.__main__", [], "xmag_jax.survival.__main__", "COMMAND"),
    ("xmag_jax.convert.__main__", ["import"], "xmag_jax.convert.__main__", "COMMANDS:import"),
    ("xmag_jax.convert.__main__", ["export"], "xmag_jax.convert.__main__", "COMMANDS:export"),
    ("xmag_jax.eval.__main__", ["mil"], "xmag_jax.eval.mil", "COMMAND"),
    ("xmag_jax.eval.__main__", ["probe"], "xmag_jax.eval.probe", "COMMAND"),
    ("xmag_jax.eval.__main__", ["fidelity"], "xmag_jax.eval.fidelity", "COMMAND"),
    ("xmag_jax.bench.__main__", ["forward"], "xmag_jax.bench.forward", "COMMAND"),
    ("xmag_jax.bench.__main__", ["parity"], "xmag_jax.bench.parity", "COMMAND"),
    ("xmag_jax.bench.__main__", ["input"], "xmag_jax.bench.input", "COMMAND"),
    ("xmag_jax.bench.__main__", ["train"], "xmag_jax.bench.train", "COMMAND"),
    ("xmag_jax.bench.__main__", ["embed"], "xmag_jax.bench.embed", "COMMAND"),
    ("xmag_jax.bench.__main__", ["finetune"], "xmag_jax.bench.finetune", "COMMAND"),
    ("xmag_jax.bench.__main__", ["prep"], "data_prep.bench", "COMMAND"),
    ("xmag_jax.demo", [], "xmag_jax.demo", "COMMAND"),
    ("xmag_jax.demo_teacher", [], "xmag_jax.demo_teacher", "COMMAND"),
    ("xmag_jax.distill.export", [], "xmag_jax.distill.export", "COMMAND"),
    ("xmag_jax.wsi.synthetic", [], "xmag_jax.wsi.synthetic", "COMMAND"),
    ("xmag_jax.embed.__main__", [], "xmag_jax.embed.__main__", "COMMAND"),
    ("data_prep.tile_pairs", [], "data_prep.tile_pairs", "COMMAND"),
    ("data_prep.tile_bags", [], "data_prep.tile_bags", "COMMAND"),
    ("data_prep.synthetic_survival", ["features"], "data_prep.synthetic_survival", "COMMANDS:features"),
    ("data_prep.synthetic_survival", ["slides"], "data_prep.synthetic_survival", "COMMANDS:slides"),
]
IDS = [" ".join([m.removesuffix(".__main__"), *words]) for m, words, _, _ in COMMANDS]


def _command(parser_module: str, attribute: str) -> cli.Command:
    name, _, key = attribute.partition(":")
    value = getattr(importlib.import_module(parser_module), name)
    return value[key] if key else value


def _run(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m module argv` in this process, as `errors.run_cli` runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        errors.run_cli(importlib.import_module(module).main, prog="prog", argv=argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _flag_blocks(help_text: str) -> dict[str, str]:
    """{flag name: its usage line and help} of a `--help` text."""
    blocks, name = {}, None
    for line in help_text.splitlines():
        if line.startswith("  --"):
            name = line[2:].split("=")[0].removeprefix("--[no]").removeprefix("--")
            blocks[name] = line
        elif name is not None and line.startswith("      "):
            blocks[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("module, words, parser_module, attribute", COMMANDS, ids=IDS)
def test_help_lists_every_flag_with_its_default(module, words, parser_module, attribute, capsys):
    command = _command(parser_module, attribute)
    code, out, _ = _run(module, [*words, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: {command.prog}")
    blocks = _flag_blocks(out)
    defined = {flag.name: flag for flag in (command.flag_values()[n] for n in command.flag_values())}
    assert set(defined) <= set(blocks), f"flags missing from --help: {set(defined) - set(blocks)}"
    for name, flag in defined.items():
        assert name == name.lower() or name == "n", f"--{name}: flags are snake_case"
        assert "-" not in name, f"--{name}: flags are snake_case"
        block = blocks[name]
        if name in command.required:
            assert "(required)" in block, block
        elif any(name in group for group in command.one_of):
            assert "is required)" in block, block
        elif name == "config":
            assert f"(default: {cli.show(command.config[0])})" in block, block
        else:
            assert f"(default: {cli.show(flag.default)})" in block, block
        if isinstance(flag, flags.BooleanFlag):
            assert block.startswith(f"--[no]{name}"), block
        if name == "mpp" or name.endswith("_mpp") or name in ("mpp_5x", "mpp_20x"):  # a pixel size
            assert "µm/px" in block, f"--{name}: the unit is missing"
        if name.endswith("_px") or name in ("size", "slide_size", "img_size"):
            assert " px" in block, f"--{name}: the unit is missing"


@pytest.mark.parametrize("module, words, parser_module, attribute", COMMANDS, ids=IDS)
def test_bad_flags_are_one_line_and_exit_2(module, words, parser_module, attribute, capsys, tmp_path):
    command = _command(parser_module, attribute)
    fv = command.flag_values()
    given = [a for n in command.required if n != "config"
             for a in (f"--{n}", "1" if isinstance(fv[n].parser, flags.IntegerParser) else str(tmp_path / n))]
    if "config" in command.required:
        given = ["--config", str(REPO / "configs" / "debug.py"), *given]
    for group in command.one_of:
        given += [f"--{group[0]}", str(tmp_path / group[0])]

    code, _, err = _run(module, [*words, *given, "--no_such_flag=1"], capsys)
    assert code == 2 and err.count("\n") == 1 and ": error: " in err, err
    assert "no_such_flag" in err

    multi_word = next((n for n in fv if "_" in n and not isinstance(fv[n], flags.BooleanFlag)), None)
    if multi_word is not None:  # the argparse spelling gets a did-you-mean
        code, _, err = _run(module, [*words, *given, f"--{multi_word.replace('_', '-')}=1"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"did you mean --{multi_word}?" in err, err

    number = next((n for n in fv if isinstance(fv[n].parser, (flags.IntegerParser, flags.FloatParser))), None)
    if number is not None:
        code, _, err = _run(module, [*words, *given, f"--{number}=many"], capsys)
        assert code == 2 and err.count("\n") == 1 and f"--{number}=many" in err, err

    if command.required:
        code, _, err = _run(module, words, capsys)
        assert code == 2 and err.count("\n") == 1 and "missing required flag" in err, err
        assert all(f"--{n}" in err for n in command.required), err


def test_subcommands_are_one_positional_word(capsys):
    code, out, _ = _run("xmag_jax.eval.__main__", ["--help"], capsys)
    assert code == 0 and "{probe,mil,fidelity}" in out
    code, _, err = _run("xmag_jax.eval.__main__", ["prob", "--npz", "x.npz"], capsys)
    assert code == 2 and err == "prog: error: unknown subcommand 'prob' (did you mean 'probe'?); one of probe, mil, " \
                                "fidelity\n"
    code, _, err = _run("data_prep.synthetic_survival", ["slides", "--out", "x", "--dim", "4"], capsys)
    assert code == 2 and "unknown flag --dim" in err  # the features writer's flag only


def test_boolean_flags_take_the_no_prefix_and_false():
    for argv in (["--noisolation"], ["--isolation=false"]):
        fv, beam = _command("data_prep.tile_pairs", "COMMAND").parse(["--slides", "s", "--out", "o", *argv,
                                                                      "--runner", "DirectRunner"])
        assert fv.isolation is False and fv.progress is True and beam == ["--runner", "DirectRunner"]


def test_config_overrides_and_their_did_you_mean():
    fv, _ = _command("xmag_jax.train", "COMMAND").parse(["--config", str(REPO / "configs" / "debug.py"),
                                                         "--workdir", "w", "--config.optim.lr=0.5"])
    assert fv.config.optim.lr == 0.5
    with pytest.raises(errors.UserError, match=r"--config.optim.lrr: not a key of the config \(did you mean "
                                               r"'optim.lr'\?\)"):
        _command("xmag_jax.train", "COMMAND").parse(["--config", str(REPO / "configs" / "debug.py"),
                                                     "--workdir", "w", "--config.optim.lrr=0.5"])


def test_every_command_imports_in_one_process():
    """Each command defines its flags on its own FlagValues: importing them all together raises no
    DuplicateFlagError (it did when train, finetune and finetune.aot defined --config on absl's global FLAGS)."""
    modules = sorted({m for m, _, _, _ in COMMANDS} | {p for _, _, p, _ in COMMANDS} | {"xmag_jax.aot.__main__"})
    code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
