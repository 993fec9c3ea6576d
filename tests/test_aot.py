"""AOT compile reports for TPU topologies (libtpu compile-only devices, no TPU needed)."""

import dataclasses
import datetime
import json

import pytest

from xmag_jax import errors, topologies
from xmag_jax.aot import cli, docs, search
from xmag_jax.aot import compile as compile_lib


@pytest.mark.parametrize("name, libtpu_name, chips, hosts", [
    ("v5p-256", "v5p:4x4x8", 128, 32),  # v5p names count TensorCores, two per chip
    ("v4-128", "v4:4x4x4", 64, 16),
    ("v5e-256", "v5e:16x16", 256, 64),  # v5e and v6e names count chips
    ("v5litepod-8", "v5e:2x4", 8, 1),
    ("v6e-256", "v6e:16x16", 256, 64),
    ("v5p:2x2x1", "v5p:2x2x1", 4, 1),
])
def test_topology_names(name, libtpu_name, chips, hosts):
    topo = topologies.parse(name)
    assert (topo.libtpu_name, topo.num_chips, topo.num_hosts) == (libtpu_name, chips, hosts)


def test_topology_compile_devices_one_per_chip_and_multislice():
    topo = topologies.parse("v4-16", slices=2)
    devices = topologies.compile_devices(topo)
    assert len(devices) == topo.num_chips == 16
    assert {d.slice_index for d in devices} == {0, 1}
    assert all(d.platform == "tpu" and d.device_kind == "TPU v4" for d in devices)
    assert len({d.process_index for d in devices}) == topo.num_hosts == 4


@pytest.mark.parametrize("name", ["v5p-7", "h100", "v7x-64", "v5e:2x2x2"])
def test_unknown_topology_lists_known_names(name):
    with pytest.raises(topologies.UnknownTopologyError) as err:
        topologies.parse(name)
    assert name in str(err.value) and "v5p-256" in str(err.value) and "v6e-256" in str(err.value)


def _debug_config():
    from configs import debug

    return debug.get_config()


@pytest.fixture(scope="module")
def debug_v5p_8():
    """The debug config's step compiled for v5p-8 (4 chips): (config, topology, report)."""
    config = _debug_config()
    topo = topologies.parse("v5p-8")
    return config, topo, compile_lib.compile_step(config, topo, config_name="configs/debug.py")


def test_debug_step_compiles_for_v5p_8_with_sane_numbers(debug_v5p_8):
    from xmag_jax import sharding
    from xmag_jax.distill import step

    config, topo, report = debug_v5p_8
    assert report.compiled and report.fits
    assert report.mesh == {"data": 4, "fsdp": 1} and report.global_batch == config.batch_size
    assert report.hbm_bytes == topo.chip.usable_hbm_bytes
    assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                  + report.temp_bytes + report.code_bytes)
    # The donated state comes back in place: outputs alias the state arguments.
    assert 0 < report.alias_bytes <= report.output_bytes
    # What the step builder says: its model FLOPs, and its sharded inputs' bytes (TPU may pad, never shrink).
    mesh = sharding.make_mesh(config.mesh, topologies.compile_devices(topo))
    trainer = step.make_trainer(config, mesh)
    assert report.model_flops == trainer.flops_per_step(config.batch_size).total
    assert report.argument_groups == compile_lib.argument_groups(trainer, config.batch_size)
    assert sum(report.argument_groups.values()) <= report.argument_bytes <= 4 * sum(report.argument_groups.values())
    assert 0.8 < report.compiled_flops_per_chip * topo.num_chips / report.model_flops < 2.0
    assert report.xla_seconds is not None and report.xla_seconds > 0
    assert report.pairs_per_second_per_chip == pytest.approx(
        config.batch_size / (report.model_flops / (4 * 459e12 * compile_lib.DEFAULT_MFU)) / 4)
    text = compile_lib.format_report(report)
    assert "fits" in text and "v5p:2x2x1" in text


def test_require_fit_fails_on_an_absurd_batch_naming_the_buffers(capsys):
    # 8 chips over 2 slices, 2^17 pairs per chip: the uint8 batch alone is ~300 GiB per chip.
    rc = cli.main(["--config", "configs/debug.py", "--topology", "v5e-4", "--slices", "2",
                   "--global_batch", str(8 * 2**17), "--require_fit", "--config.optim.grad_accum=1"])
    out, err = capsys.readouterr()
    assert rc == cli.NOT_FIT_EXIT
    assert out.startswith("configs/debug.py --config.optim.grad_accum=1 on v5e-4")  # overrides from argv
    assert "DOES NOT FIT (over by" in out and "dominant buffers: batch (uint8 images)" in out
    assert "does not fit" in err and "15.75 GiB available" in err


def test_cli_unknown_topology_lists_known_names(capsys):
    rc = cli.main(["--config", "configs/debug.py", "--topology", "v5p-7"])
    assert rc == 2
    assert "known v5p names: v5p-8, v5p-16" in capsys.readouterr().err


def test_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--topology" in out and "find_batch" in out and "require_fit" in out


def _linear_hbm_compile(calls: list):
    """Stands in for XLA in tests of the search and the page: fixed 2 GiB + 0.3 GiB per pair per chip."""

    def fake_compile(config, topo, *, global_batch=None, mfu=compile_lib.DEFAULT_MFU, config_name="", devices=None):
        global_batch = global_batch or config.batch_size
        calls.append((config_name, topo.name, global_batch))
        total = int((2 + 0.3 * global_batch / topo.num_chips) * topologies.GiB)
        return compile_lib.Report(config_name, topo.describe(), {"data": topo.num_chips, "fsdp": 1}, global_batch,
                          compile_lib.knobs(config), fits=total <= topo.chip.usable_hbm_bytes, compiled=True,
                          hbm_bytes=topo.chip.usable_hbm_bytes, argument_bytes=2 * topologies.GiB, output_bytes=0,
                          alias_bytes=0, temp_bytes=total - 2 * topologies.GiB, code_bytes=0, total_bytes=total,
                          model_flops=1e12, argument_groups={"teacher params": 2 * topologies.GiB})

    return fake_compile


def test_find_batch_brackets_then_lands_on_the_largest_fit(monkeypatch):
    """The search logic on a linear HBM model instead of XLA."""
    topo = topologies.parse("v5e-8")
    calls = []
    monkeypatch.setattr(compile_lib, "compile_step", _linear_hbm_compile(calls))
    best, tries = search.find_batch(_debug_config(), topo, log=lambda s: None)
    largest = max(b for b in range(8, 10_000, 8) if 2 + 0.3 * b / 8 <= 15.75)
    assert best.global_batch == largest == 360
    assert calls[0][2] == 8 and len(calls) <= 5
    assert any(t.global_batch == largest + 8 and not t.fits for t in tries)


def test_docs_cheap_mode_writes_the_whole_page_then_rerenders_it(debug_v5p_8, tmp_path, monkeypatch):
    """`--docs --nosearch` on the debug config: one compile per case (the fixture's real one), the whole page
    with its provenance, then a rerender from the JSON."""
    import jax

    monkeypatch.setattr(docs, "TABLE", (("configs/debug.py", "debug teacher → debug student", ("v5p-8",)),))
    monkeypatch.setattr(docs, "KNOB_CONFIG", "configs/debug.py")
    monkeypatch.setattr(docs, "KNOB_TOPOLOGY", "v5p-8")
    monkeypatch.setattr(docs, "KNOB_VARIANTS", (("accum2", "grad_accum 2", {"optim.grad_accum": 2}),))
    config, topo, compiled = debug_v5p_8
    calls = []

    def compile_step(config, topo, *, global_batch, mfu, config_name):  # the fixture's compile, once per case
        calls.append(config_name)
        assert (topo.name, global_batch, mfu) == ("v5p-8", 4 * config.optim.grad_accum, compile_lib.DEFAULT_MFU)
        return dataclasses.replace(compiled, config_name=config_name, knobs=compile_lib.knobs(config))

    monkeypatch.setattr(compile_lib, "compile_step", compile_step)
    page = tmp_path / "aot.md"
    assert cli.main(["--docs", str(page), "--nosearch"]) == 0
    assert calls == ["configs/debug.py", "configs/debug.py --config.optim.grad_accum=2"]  # no search compiles
    text = page.read_text()
    assert text.startswith("# Ahead-of-time TPU compile reports\n")
    assert (f"- every case: `python -m xmag_jax.aot --docs {page} --nosearch` on "
            f"{datetime.date.today().isoformat()}, jax {jax.__version__}, libtpu ") in text
    row = next(line for line in text.splitlines() if line.startswith("| debug teacher → debug student | v5p-8"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "data 4×fsdp 1" and cells[3] == "4" and cells[4].startswith("fits, ")
    assert cells[5].startswith("≈ ") and cells[5].endswith("/chip; estimate)") and cells[6] == "—"
    assert int(cells[5].split()[1]) % 4 == 0 and int(cells[5].split()[1]) > 4
    assert cells[10] == datetime.date.today().isoformat()  # the row's compile date
    knob = next(line for line in text.splitlines() if line.startswith("| grad_accum 2 |"))
    assert "| optim.grad_accum=2 | yes |" in knob
    assert "## What dominates HBM" in text and "## Memory/precision knobs" in text and "not compiled" not in text
    # The JSON round-trips the reports; a rerender at another MFU halves the projection and compiles nothing.
    saved = json.loads((tmp_path / "aot.json").read_text())["cases"]["debug/v5p-8"]
    report = compile_lib.Report.from_json(saved["tries"][0])
    assert compile_lib.Report.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert cli.main(["--docs", str(page), "--rerender", "--mfu", "0.25"]) == 0
    rerendered = next(line for line in page.read_text().splitlines() if line.startswith(row[:40]))
    assert len(calls) == 2
    assert rerendered.split("|")[8].strip().startswith(f"{report.pairs_per_second / 2:.0f} ")


def test_docs_rows_pattern_matching_nothing_is_one_line():
    with pytest.raises(errors.UserError, match=r"--rows: 'uni2h/\*' matches no case.*uni2h_vits14/v5p-256"):
        cli.main(["--docs", "unused.md", "--rows", "uni2h/*"])


def test_docs_processes_fill_one_page(monkeypatch, tmp_path):
    """Rows of two topologies from two runs and the knob variants from a third merge into one page."""
    calls = []
    monkeypatch.setattr(compile_lib, "compile_step", _linear_hbm_compile(calls))
    monkeypatch.setattr(docs, "TABLE", (("configs/debug.py", "debug", ("v5e-8", "v6e-8")),))
    monkeypatch.setattr(docs, "KNOB_CONFIG", "configs/debug.py")
    monkeypatch.setattr(docs, "KNOB_TOPOLOGY", "v5e-8")
    page = str(tmp_path / "aot.md")
    for topology in ("v6e-8", "v5e-8"):
        assert cli.main(["--docs", page, "--rows", f"debug/{topology}", "--resume"]) == 0
    rows_calls = len(calls)
    assert cli.main(["--docs", page, "--rows", "knobs/*", "--nosearch"]) == 0
    text = (tmp_path / "aot.md").read_text()
    # v5e-8 (15.75 GiB): largest multiple of 8 with 2 + 0.3 * b / 8 <= 15.75 is 360; v6e-8 (31.24 GiB): 776.
    assert "| debug | v5e-8 | data 8×fsdp 1 | 8 | fits, " in text and "| 360 (45/chip) |" in text
    assert "| debug | v6e-8 |" in text and "| 776 (97/chip) |" in text
    assert "not compiled yet" not in text
    labels = [label for _, label, _ in docs.KNOB_VARIANTS]
    variants = [line.split("|")[1].strip() for line in text.splitlines()
                if line.split("|")[1:2] and line.split("|")[1].strip() in ["as configured", *labels]]
    assert variants == ["as configured", *labels]
    # The knob base is the table row; each variant compiles once, with its overrides through --config.KEY=VALUE.
    assert [c[0] for c in calls[rows_calls:]] == [
        "configs/debug.py" + "".join(f" --config.{k}={v}" for k, v in overrides.items())
        for _, _, overrides in docs.KNOB_VARIANTS]
    assert calls[rows_calls + 3][2] == 8 * 4  # grad_accum 4: the page batch is a multiple of 8 chips x 4


@pytest.mark.parametrize("fsdp", [4, 16])
def test_mesh_maps_onto_the_v6e_torus_splitting_an_axis_only_when_needed(fsdp):
    import ml_collections
    import numpy as np

    from xmag_jax import sharding

    devices = topologies.compile_devices(topologies.parse("v6e-256"))
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": fsdp}), devices)
    assert dict(mesh.shape) == {"data": 256 // fsdp, "fsdp": fsdp}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    group = np.array([d.coords for d in mesh.devices[0]])  # one fsdp group: a line of neighbouring chips
    varying = [axis for axis in range(group.shape[1]) if len(set(group[:, axis])) > 1]
    assert len(varying) == 1 and len(set(group[:, varying[0]])) == fsdp


def test_finetune_aot_unknown_topology_is_one_line():
    """The finetune report names a bad topology like the train report does (a UserError, not a traceback)."""
    from xmag_jax.finetune import aot as finetune_aot

    with pytest.raises(errors.UserError, match="unknown TPU topology 'v9-8'"):
        finetune_aot.main(["--config", "configs/mil_e2e_debug.py", "--model", "vit_test", "--topology", "v9-8"])
