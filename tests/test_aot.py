"""AOT compile reports for TPU topologies (libtpu compile-only devices, no TPU needed)."""

import pytest

from xmag_jax import topologies


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
