"""AOT compile reports for TPU topologies (libtpu compile-only devices, no TPU needed)."""

import json

import pytest

from xmag_jax import aot, topologies


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
    return config, topo, aot.compile_step(config, topo, config_name="configs/debug.py")


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
    assert report.argument_groups == aot.argument_groups(trainer, config.batch_size)
    assert sum(report.argument_groups.values()) <= report.argument_bytes <= 4 * sum(report.argument_groups.values())
    assert 0.8 < report.compiled_flops_per_chip * topo.num_chips / report.model_flops < 2.0
    assert report.xla_seconds is not None and report.xla_seconds > 0
    assert report.pairs_per_second_per_chip == pytest.approx(
        config.batch_size / (report.model_flops / (4 * 459e12 * aot.DEFAULT_MFU)) / 4)
    text = aot.format_report(report)
    assert "fits" in text and "v5p:2x2x1" in text


def test_require_fit_fails_on_an_absurd_batch_naming_the_buffers(capsys):
    # 8 chips over 2 slices, 2^17 pairs per chip: the uint8 batch alone is ~300 GiB per chip.
    rc = aot.main(["aot", "--config", "configs/debug.py", "--topology", "v5e-4", "--slices", "2",
                   "--global_batch", str(8 * 2**17), "--require_fit"])
    out, err = capsys.readouterr()
    assert rc == aot.NOT_FIT_EXIT
    assert "DOES NOT FIT (over by" in out and "dominant buffers: batch (uint8 images)" in out
    assert "does not fit" in err and "15.75 GiB available" in err


def test_cli_unknown_topology_lists_known_names(capsys):
    rc = aot.main(["aot", "--config", "configs/debug.py", "--topology", "v5p-7"])
    assert rc == 2
    assert "known v5p names: v5p-8, v5p-16" in capsys.readouterr().err


def test_cli_help_lists_the_flags(capsys):
    assert aot.main(["aot", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--topology" in out and "find_batch" in out and "require_fit" in out


def _linear_hbm_compile(calls: list):
    """Stands in for XLA in tests of the search and the page: fixed 2 GiB + 0.3 GiB per pair per chip."""

    def fake_compile(config, topo, *, global_batch=None, mfu=aot.DEFAULT_MFU, config_name="", devices=None):
        global_batch = global_batch or config.batch_size
        calls.append((config_name, topo.name, global_batch))
        total = int((2 + 0.3 * global_batch / topo.num_chips) * topologies.GiB)
        return aot.Report(config_name, topo.describe(), {"data": topo.num_chips, "fsdp": 1}, global_batch,
                          aot.knobs(config), fits=total <= topo.chip.usable_hbm_bytes, compiled=True,
                          hbm_bytes=topo.chip.usable_hbm_bytes, argument_bytes=2 * topologies.GiB, output_bytes=0,
                          alias_bytes=0, temp_bytes=total - 2 * topologies.GiB, code_bytes=0, total_bytes=total,
                          model_flops=1e12, argument_groups={"teacher params": 2 * topologies.GiB})

    return fake_compile


def test_find_batch_brackets_then_lands_on_the_largest_fit(monkeypatch):
    """The search logic on a linear HBM model instead of XLA."""
    topo = topologies.parse("v5e-8")
    calls = []
    monkeypatch.setattr(aot, "compile_step", _linear_hbm_compile(calls))
    best, tries = aot.find_batch(_debug_config(), topo, log=lambda s: None)
    largest = max(b for b in range(8, 10_000, 8) if 2 + 0.3 * b / 8 <= 15.75)
    assert best.global_batch == largest == 360
    assert calls[0][2] == 8 and len(calls) <= 5
    assert any(t.global_batch == largest + 8 and not t.fits for t in tries)


def test_docs_page_renders_and_rerenders_from_json(debug_v5p_8, tmp_path, monkeypatch):
    from xmag_jax import aot_docs

    config, topo, report = debug_v5p_8
    assert aot.Report.from_json(json.loads(json.dumps(report.to_json()))) == report
    monkeypatch.setattr(aot_docs, "CONFIGS", (("configs/debug.py", "debug teacher → debug student"),))
    monkeypatch.setattr(aot_docs, "TOPOLOGIES", ("v5p-8", "v6e-4"))
    rows = {"rows": [{"config": "configs/debug.py", "topology": "v5p-8", "tries": [report.to_json()]}]}
    (tmp_path / "aot.json").write_text(json.dumps(rows))
    (tmp_path / "aot_knobs.json").write_text(json.dumps({"knobs": [report.to_json()]}))
    assert aot.main(["aot", "--docs", str(tmp_path / "aot.md"), "--rerender"]) == 0
    page = (tmp_path / "aot.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| debug teacher → debug student | v5p-8"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "data 4×fsdp 1" and cells[3].startswith("fits, ")
    assert cells[4].startswith("≈ ") and cells[4].endswith("/chip; estimate)")
    assert int(cells[4].split()[1]) % 4 == 0 and int(cells[4].split()[1]) > config.batch_size
    assert cells[6].startswith(f"{report.pairs_per_second:.0f} ")
    assert "| debug teacher → debug student | v6e-4 | not compiled yet |" in page
    assert "## Memory/precision knobs" in page


def test_docs_processes_fill_one_page(monkeypatch, tmp_path):
    """Rows of two topologies from two runs and the knob variants from a third merge into one page."""
    from xmag_jax import aot_docs

    calls = []
    monkeypatch.setattr(aot, "compile_step", _linear_hbm_compile(calls))
    monkeypatch.setattr(aot_docs, "CONFIGS", (("configs/debug.py", "debug"),))
    monkeypatch.setattr(aot_docs, "TOPOLOGIES", ("v5e-8", "v6e-8"))
    monkeypatch.setattr(aot_docs, "KNOB_CONFIG", "configs/debug.py")
    monkeypatch.setattr(aot_docs, "KNOB_TOPOLOGY", "v5e-8")
    page = str(tmp_path / "aot.md")
    for topology in ("v6e-8", "v5e-8"):
        assert aot.main(["aot", "--docs", page, "--docs_part", "rows", "--docs_topologies", topology,
                         "--docs_resume"]) == 0
    assert aot.main(["aot", "--docs", page, "--docs_part", "knobs", "--docs_resume"]) == 0
    text = (tmp_path / "aot.md").read_text()
    # v5e-8 (15.75 GiB): largest multiple of 8 with 2 + 0.3 * b / 8 <= 15.75 is 360; v6e-8 (31.24 GiB): 776.
    assert "| debug | v5e-8 | data 8×fsdp 1 | fits, " in text and "| 360 (45/chip) |" in text
    assert "| debug | v6e-8 |" in text and "| 776 (97/chip) |" in text
    assert "not compiled yet" not in text
    variants = [line.split("|")[1].strip() for line in text.splitlines()
                if line.split("|")[1:2] and line.split("|")[1].strip() in dict(aot_docs.KNOB_VARIANTS)]
    assert variants == [label for label, _ in aot_docs.KNOB_VARIANTS]
    # The knob base reuses the row's compile; the four variants compile once each.
    knob_calls = [c for c in calls if c[1] == "v5e-8" and c[2] == _debug_config().batch_size]
    assert len(knob_calls) == 1 + 4


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
