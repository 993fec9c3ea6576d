"""The demo's whole loop, small: synthetic slides -> pairs -> stand-in teacher -> distillation -> export -> timm ->
embeddings -> probe; the timm export of the distilled student computes the Flax checkpoint's features."""

import json

import numpy as np
import pytest
from flax import nnx

from xmag_jax import demo
from xmag_jax.models import checkpoint, registry


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["--out", str(out), "--slides", "4", "--slide-size", "4096", "--teacher-steps", "10", "--steps", "6"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("XLA_FLAGS", raising=False)  # the stages run as on a laptop: one CPU device, not conftest's 8
        assert demo.main(argv) == 0
    return out


def test_loop_writes_every_stage_and_compares_the_students(demo_out, capsys):
    teacher, arch = checkpoint.load_model(demo_out / "teacher")
    assert arch.name == "vit_test_teacher" and arch.vit == registry.get_arch("vit_test_teacher").vit
    results = json.loads((demo_out / "probe.json").read_text())
    assert set(results) == {"distilled", "random_init"}
    for r in results.values():
        assert r["n_slides"] == 4 and r["n_tiles"] > 4
        for method in ("linear", "knn"):
            assert 0.0 <= r[method]["auc"]["value"] <= 1.0
    line = demo.comparison_line(demo_out / "probe.json")
    assert line.startswith("distilled vs random-init student at 5x: linear balanced acc")


def test_timm_export_computes_the_flax_students_features(demo_out):
    import timm
    import torch

    from xmag_jax.bench.parity import timm_embedding

    model, arch = checkpoint.load_model(demo_out / "student")
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)
    flax_features = np.asarray(registry.embed(arch, model(registry.normalize(arch, images))))
    net = timm.create_model(f"local-dir:{demo_out / 'student_timm'}", pretrained=True).eval()
    x = torch.from_numpy(np.asarray(registry.normalize(arch, images), np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        timm_features = timm_embedding(arch, net, net.forward_features(x))
    np.testing.assert_allclose(timm_features, flax_features, rtol=1e-4, atol=1e-4)
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fresh = nnx.to_pure_dict(nnx.state(registry.create_model("vit_test", rngs=nnx.Rngs(0)), nnx.Param))
    assert not np.allclose(trained["patch_embed"]["proj"]["kernel"], fresh["patch_embed"]["proj"]["kernel"])
