"""timm <-> Flax: random-init timm models -> safetensors -> import -> same numbers; export -> timm reloads.

Giant teachers keep their full width at reduced depth. Registry entries with identical ViTConfig and timm
model (uni = phikon_v2, h_optimus_0 = h_optimus_1) are checked once, after asserting they are identical.
"""

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.torch import save_file

from xmag_jax import errors
from xmag_jax.bench.parity import randomize_init_constants_, timm_embedding
from xmag_jax.convert import StateDictMismatch, flax_from_state_dict, import_timm, read_state_dict
from xmag_jax.convert.__main__ import main as convert_main
from xmag_jax.models import ARCHS, embed, get_arch
from xmag_jax.models.checkpoint import load_model

DEPTH = {"uni": 1, "uni2_h": 1, "virchow2": 1, "h_optimus_0": 1, "gigapath": 1, "vit_s14": 4, "vit_b14": 2}
PARITY = ["uni", "uni2_h", "virchow2", "h_optimus_0", "gigapath", "vit_s14", "vit_b14", "vit_test",
          "vit_test_teacher"]
SAME_AS = {"phikon_v2": "uni", "h_optimus_1": "h_optimus_0", "xmag_vitb14": "vit_b14"}
EXPORTED = ["vit_test_teacher", "virchow2", "vit_s14"]
TOL = 1e-4

forward = nnx.jit(lambda model, x: model(x))


def test_every_registry_entry_is_covered():
    assert set(PARITY) | set(SAME_AS) == set(ARCHS)
    for name, twin in SAME_AS.items():
        assert (ARCHS[name].vit, ARCHS[name].timm_arch) == (ARCHS[twin].vit, ARCHS[twin].timm_arch)


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (timm model, Flax model, arch, checkpoint path), built once."""
    out = {}
    for i, name in enumerate(PARITY):
        arch = get_arch(name, **({"depth": DEPTH[name]} if name in DEPTH else {}))
        model = timm.create_model(arch.timm_arch, **arch.timm_kwargs).eval()
        randomize_init_constants_(model, i)
        d = tmp_path_factory.mktemp(name)
        save_file(model.state_dict(), str(d / "model.safetensors"))
        flax_model, ckpt = import_timm(name, d / "model.safetensors", d / "ckpt", depth=arch.vit.depth)
        out[name] = (model, flax_model, arch, ckpt)
    return out


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", PARITY)
def test_flax_matches_timm(converted, name, size):
    model, flax_model, arch, _ = converted[name]
    x = _images(size)
    with torch.inference_mode():
        feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    out = forward(flax_model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(embed(arch, out)), timm_embedding(arch, model, feats), atol=TOL, rtol=0)
    g = size // arch.vit.patch_size
    ref_patches = feats[:, model.num_prefix_tokens:].reshape(1, g, g, -1).numpy()
    np.testing.assert_allclose(np.asarray(out.patches), ref_patches, atol=TOL, rtol=0)
    assert np.abs(ref_patches).max() > 0.1  # outputs carry signal: the comparison is not trivially zero


@pytest.mark.parametrize("overrides", [
    {"global_pool": "avg"},  # timm: fc_norm after pooling, no final norm
    {"global_pool": "avg", "fc_norm": False},
    {"class_token": False, "global_pool": "avg", "reg_tokens": 2},
    {"qkv_bias": False, "init_values": None, "mlp_ratio": 3.3},  # fc1 width int(64 * 3.3) = 211
])
def test_pooling_and_mlp_variants_match_timm(overrides):
    arch = get_arch("vit_test", **overrides)
    model = timm.create_model(arch.timm_arch, **arch.timm_kwargs).eval()
    randomize_init_constants_(model, 11)
    flax_model = flax_from_state_dict(arch, {k: v.numpy() for k, v in model.state_dict().items()}, "timm")
    x = _images(224, seed=3)
    with torch.inference_mode():
        feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        pooled = model.forward_head(feats, pre_logits=True)
    out = forward(flax_model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out.pooled), pooled.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(out.patches).reshape(1, 256, -1), feats[:, model.num_prefix_tokens:].numpy(),
                               atol=TOL)


def test_downsampled_position_embeddings_match_timm(converted):
    model, flax_model, arch, _ = converted["vit_test_teacher"]
    x = _images(168)
    with torch.inference_mode():
        feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    out = forward(flax_model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out.patches).reshape(1, 144, -1), feats[:, 5:].numpy(), atol=TOL)


def test_export_reloads_in_timm_without_xmag_jax(converted, tmp_path):
    inputs, expected, dirs = {}, {}, {}
    for name in EXPORTED:
        _, flax_model, arch, ckpt = converted[name]
        dirs[name] = str(tmp_path / f"export_{name}")
        assert convert_main(["export", "--checkpoint", str(ckpt), "--out", dirs[name]]) == 0
        x = _images(224, seed=7)
        np.save(tmp_path / f"{name}_x.npy", x)
        out = forward(flax_model, jnp.asarray(x))
        expected[name] = (np.asarray(embed(arch, out)), np.asarray(out.patches))
        inputs[name] = str(tmp_path / f"{name}_x.npy")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["xmag_jax"] = None  # the exported model must not need xmag_jax
        import json, numpy as np, timm, torch
        from timm.data import resolve_data_config
        for name, d in {dirs!r}.items():
            model = timm.create_model("local-dir:" + d, pretrained=True).eval()
            x = torch.from_numpy(np.load({inputs!r}[name])).permute(0, 3, 1, 2)
            with torch.inference_mode():
                feats = model.forward_features(x)
                pooled = model.forward_head(feats, pre_logits=True)
            np.save(d + "/feats.npy", feats.numpy())
            np.save(d + "/pooled.npy", pooled.numpy())
            cfg = resolve_data_config({{}}, model=model)
            json.dump({{"mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": list(cfg["input_size"]),
                       "prefix": model.num_prefix_tokens}}, open(d + "/data_cfg.json", "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    for name in EXPORTED:
        arch = converted[name][2]
        data_cfg = json.loads((tmp_path / f"export_{name}" / "data_cfg.json").read_text())
        assert np.allclose(data_cfg["mean"], arch.mean) and np.allclose(data_cfg["std"], arch.std)
        assert data_cfg["input_size"] == [3, 224, 224]
        feats = np.load(f"{dirs[name]}/feats.npy")
        pooled = np.load(f"{dirs[name]}/pooled.npy")
        p = data_cfg["prefix"]
        timm_embed = (np.concatenate([feats[:, 0], feats[:, p:].mean(1)], -1)
                      if arch.embedding == "cls_mean_patch" else pooled)
        np.testing.assert_allclose(expected[name][0], timm_embed, atol=TOL, rtol=0)
        np.testing.assert_allclose(expected[name][1].reshape(feats[:, p:].shape), feats[:, p:], atol=TOL, rtol=0)


def test_cli_import_and_pytorch_bin(converted, tmp_path):
    model, flax_model, arch, _ = converted["vit_test"]
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    rc = convert_main(["import", "--model", "vit_test", "--weights", str(tmp_path / "pytorch_model.bin"),
                       "--out", str(tmp_path / "ck")])
    assert rc == 0
    loaded, loaded_arch = load_model(tmp_path / "ck")
    assert loaded_arch.name == "vit_test"
    x = jnp.asarray(_images(224))
    np.testing.assert_array_equal(forward(loaded, x).patches, forward(flax_model, x).patches)


class _NotATensor:
    pass


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "evil.bin")


def test_wrong_architecture_lists_keys_and_shapes(converted, tmp_path, capsys):
    model = converted["vit_test"][0]
    save_file(model.state_dict(), str(tmp_path / "student.safetensors"))
    with pytest.raises(StateDictMismatch) as err:
        import_timm("vit_test_teacher", tmp_path / "student.safetensors", tmp_path / "ck")
    msg = str(err.value)
    assert "student.safetensors" in msg
    assert "missing keys (1): reg_token" in msg
    assert "blocks.0.mlp.fc1.weight: checkpoint [256, 64] vs model [512, 96]" in msg
    assert "pos_embed: checkpoint [1, 257, 64] vs model [1, 256, 96]" in msg
    assert not (tmp_path / "ck").exists()
    for model, expected in (("vit_test_teacher", "missing keys (1): reg_token"), ("nope", "unknown model 'nope'")):
        with pytest.raises(SystemExit) as exit_:
            errors.run_cli(convert_main, prog="convert", argv=["import", "--model", model, "--weights",
                                                               str(tmp_path / "student.safetensors"),
                                                               "--out", str(tmp_path / "ck2")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("convert: error: ") and err.count("\n") == 1
        assert expected in err


def test_unexpected_keys_are_listed(converted, tmp_path):
    sd = dict(converted["vit_test"][0].state_dict())
    sd["head.weight"] = torch.zeros(10, 64)
    save_file(sd, str(tmp_path / "with_head.safetensors"))
    with pytest.raises(StateDictMismatch, match=r"unexpected keys \(1\): head.weight"):
        import_timm("vit_test", tmp_path / "with_head.safetensors", tmp_path / "ck")


def test_bfloat16_safetensors_import(converted, tmp_path):
    model = converted["vit_test"][0]
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    flax_model, _ = import_timm("vit_test", tmp_path / "bf16.safetensors", tmp_path / "ck")
    np.testing.assert_array_equal(np.asarray(flax_model.blocks[1].mlp.fc1.kernel[...]),
                                  sd["blocks.1.mlp.fc1.weight"].float().numpy().T)
