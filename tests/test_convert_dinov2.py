"""DINOv2's and XMAG's released weights -> import -> what the official DINOv2 code computes at 224 px.

The reference is the official `DinoVisionTransformer` (pip `dinov2==0.0.1.dev2`, plain attention without
xformers) built as torch.hub's `dinov2_vitb14` (518 px, patch 14, LayerScale, no block chunking) at full ViT-B
width and depth 2, its LayerScale gammas, norms, biases and tokens randomised. Its state dict is written in each
released layout: XMAG's `{"state_dict": {"model.<key>": ...}}` `.ckpt`, the `student_ema.model.` prefix, the
torch.hub `.pth` (with `mask_token`) and timm's `vit_base_patch14_dinov2.lvd142m` safetensors.
"""

import functools
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer
from flax import nnx
from safetensors.torch import save_file

from xmag_jax import encoders, errors
from xmag_jax.bench.parity import randomize_init_constants_
from xmag_jax.convert import StateDictMismatch, export_timm, import_timm
from xmag_jax.convert.__main__ import main as convert_main
from xmag_jax.convert.timm_io import load_weights
from xmag_jax.models import embed, get_arch
from xmag_jax.models.pos_embed import dinov2_resample_pos_embed

DEPTH = 2
TOL = 1e-4
WIDTH = {"vit_b14": (768, 12), "vit_s14": (384, 6)}

forward = nnx.jit(lambda model, x: model(x))


def official_model(name: str = "vit_b14", seed: int = 0) -> DinoVisionTransformer:
    """torch.hub's dinov2_vit{b,s}14 (dinov2/hub/backbones.py: img_size 518, init_values 1.0, block_chunks 0)."""
    dim, heads = WIDTH[name]
    model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=dim, depth=DEPTH, num_heads=heads,
                                  mlp_ratio=4, init_values=1.0, block_chunks=0,
                                  block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()
    randomize_init_constants_(model, seed)
    return model


@pytest.fixture(scope="module")
def official():
    return official_model()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Normalised images `[2, 224, 224, 3]` float32."""
    return np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)


def _reference(model: DinoVisionTransformer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official forward at 224 px: final-norm CLS `[B, D]` and patch tokens `[B, 16, 16, D]`."""
    with torch.inference_mode():
        out = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    return out["x_norm_clstoken"].numpy(), out["x_norm_patchtokens"].reshape(len(images), 16, 16, -1).numpy()


def _write(official: DinoVisionTransformer, layout: str, directory) -> str:
    """The official model's weights as the release `layout` writes them; returns the file path."""
    sd = official.state_dict()
    if layout == "xmag_ckpt":
        path = directory / "xmag.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    elif layout == "student_ema_pth":
        path = directory / "student_ema.pth"
        torch.save({f"student_ema.model.{k}": v for k, v in sd.items()}
                   | {"student.model.cls_token": sd["cls_token"], "head_global.0.weight": torch.zeros(4, 4)}, path)
    elif layout == "hub_pth":
        path = directory / "dinov2_vit14_pretrain.pth"
        torch.save(dict(sd), path)
    else:  # timm's vit_base_patch14_dinov2.lvd142m: timm's own module tree at 518 px, no mask_token
        model = timm.create_model("vit_base_patch14_dinov2", img_size=518, depth=DEPTH, num_classes=0)
        model.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"}, strict=True)
        path = directory / "model.safetensors"
        save_file(model.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def release(official, tmp_path_factory):
    """(XMAG release .ckpt path, its imported model checkpoint dir, import notes)."""
    d = tmp_path_factory.mktemp("release")
    path = _write(official, "xmag_ckpt", d)
    notes = []
    _, ckpt = import_timm("xmag_vitb14", path, d / "ckpt", note=notes.append, depth=DEPTH)
    return path, ckpt, notes


def test_reference_has_the_release_key_layout(official):
    sd = official.state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 1 + 37 * 37, 768) and tuple(sd["mask_token"].shape) == (1, 768)
    assert tuple(sd["blocks.1.ls1.gamma"].shape) == (768,) and "blocks.1.ls2.gamma" in sd
    assert not any(k.startswith("blocks.0.0.") for k in sd)  # no block chunking


@pytest.mark.parametrize("layout,name", [("xmag_ckpt", "xmag_vitb14"), ("student_ema_pth", "xmag_vitb14"),
                                         ("hub_pth", "vit_b14"), ("timm_safetensors", "vit_b14"),
                                         ("hub_pth", "vit_s14")])
def test_import_computes_the_official_224px_forward(official, images, layout, name, tmp_path):
    if name == "vit_s14":
        official = official_model("vit_s14", seed=1)
    path = _write(official, layout, tmp_path)
    notes = []
    arch = get_arch(name, depth=DEPTH)
    out = forward(load_weights(arch, path, note=notes.append), jnp.asarray(images))
    cls, patches = _reference(official, images)
    np.testing.assert_allclose(np.asarray(embed(arch, out)), cls, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.patches), patches, atol=TOL, rtol=0)
    assert np.abs(cls).max() > 0.1
    dim = arch.vit.embed_dim
    assert any("resampled to 16x16 (224 px)" in n and f"[1, 1370, {dim}]" in n for n in notes)
    assert any(f"dropped mask_token [1, {dim}]" in n for n in notes) == (layout != "timm_safetensors")
    assert any("left out 2 other tensors" in n for n in notes) == (layout == "student_ema_pth")


def test_timm_or_size_based_resampling_would_fail_the_parity_test(official, images, release):
    """The 1e-4 comparison above tells DINOv2's resampling from timm's (antialias, output size) and from a plain
    bicubic resize to 16x16 (output size instead of DINOv2's scale factor)."""
    from xmag_jax.models.checkpoint import load_model

    model, _ = load_model(release[1])
    cls, _ = _reference(official, images)
    table = official.state_dict()["pos_embed"]
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    others = {
        "timm": timm.layers.resample_abs_pos_embed(table, (16, 16), num_prefix_tokens=1),
        "size": torch.cat([table[:, :1], F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
                           .permute(0, 2, 3, 1).reshape(1, 256, -1)], 1),
    }
    for what, other in others.items():
        model.pos_embed[...] = jnp.asarray(other.numpy())
        diff = np.abs(np.asarray(forward(model, jnp.asarray(images)).pooled) - cls).max()
        assert diff > 10 * TOL, what


@pytest.mark.parametrize("size,grid", [(37, 16), (37, 32), (16, 37)])
def test_dinov2_resampling_is_torch_interpolate_with_the_scale_factor(size, grid):
    table = torch.randn(1, 8, size, size, generator=torch.Generator().manual_seed(size + grid))
    ref = F.interpolate(table, scale_factor=((grid + 0.1) / size,) * 2, mode="bicubic")
    ours = dinov2_resample_pos_embed(table.permute(0, 2, 3, 1).reshape(1, size * size, 8).numpy(), grid)
    np.testing.assert_allclose(ours.reshape(1, grid, grid, 8), ref.permute(0, 2, 3, 1).numpy(), atol=5e-5)


def test_encoder_reads_the_release_file(official, release):
    """`--model xmag_vitb14 --weights FILE` (embed, eval) goes through the same importer: uint8 tiles ->
    ImageNet normalisation -> final-norm CLS, as XMAG's encode.py computes it."""
    enc = encoders.load_encoder(model="xmag_vitb14", weights=release[0], depth=DEPTH)
    tiles = np.random.default_rng(2).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)  # 8 host devices
    arch = get_arch("xmag_vitb14")
    x = ((tiles / 255.0 - np.array(arch.mean)) / np.array(arch.std)).astype(np.float32)
    assert enc.embed_dim == 768
    np.testing.assert_allclose(np.asarray(enc.forward(tiles)), _reference(official, x)[0], atol=TOL, rtol=0)
    assert any("dropped mask_token" in n for n in release[2])


def test_export_reloads_in_timm_at_224px(official, images, release, tmp_path):
    out = export_timm(release[1], tmp_path / "timm_xmag")
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["xmag_jax"] = None  # the exported model must not need xmag_jax
        import numpy as np, timm, torch
        model = timm.create_model("local-dir:{out}", pretrained=True).eval()
        assert tuple(model.pos_embed.shape) == (1, 257, 768), model.pos_embed.shape
        with torch.inference_mode():
            feats = model.forward_features(torch.from_numpy(np.load("{tmp_path}/x.npy")).permute(0, 3, 1, 2))
        np.save("{tmp_path}/feats.npy", feats.numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    feats = np.load(tmp_path / "feats.npy")
    cls, patches = _reference(official, images)
    np.testing.assert_allclose(feats[:, 0], cls, atol=TOL, rtol=0)
    np.testing.assert_allclose(feats[:, 1:].reshape(patches.shape), patches, atol=TOL, rtol=0)


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        errors.run_cli(convert_main, prog="convert", argv=argv)
    *notes, err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err.startswith("convert: error: ")
    assert all(n.startswith("note: ") for n in notes)  # what import dropped or resampled before it failed
    return err


def test_weights_of_another_size_list_keys_and_shapes(tmp_path, capsys):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_model("vit_s14").state_dict(), path)
    with pytest.raises(StateDictMismatch) as e:
        import_timm("vit_b14", path, tmp_path / "ck", note=lambda _: None, depth=DEPTH)
    assert "pos_embed: checkpoint [1, 1370, 384] vs model [1, 257, 768]" in str(e.value)
    assert "blocks.1.attn.qkv.weight: checkpoint [1152, 384] vs model [2304, 768]" in str(e.value)
    err = _cli_error(capsys, ["import", "--model", "vit_b14", "--weights", str(path), "--out", str(tmp_path / "c")])
    assert "missing keys (140): blocks.10.attn.proj.bias" in err and "shape mismatches" in err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "c").exists()


def test_unknown_layout_names_the_understood_ones(tmp_path, capsys):
    torch.save({"state_dict": {"encoder.conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.ckpt")
    err = _cli_error(capsys, ["import", "--model", "xmag_vitb14", "--weights", str(tmp_path / "resnet.ckpt"),
                              "--out", str(tmp_path / "ck")])
    assert "resnet.ckpt: no ViT found (keys ['encoder.conv1.weight'])" in err
    for layout in ("timm VisionTransformer", "DINOv2 torch.hub", "XMAG release", "transformers Dinov2Model"):
        assert layout in err


def test_nan_and_inf_weights_are_refused_by_name(official, tmp_path, capsys):
    sd = {f"model.{k}": v.clone() for k, v in official.state_dict().items()}
    sd["model.blocks.1.attn.qkv.weight"][3, 5] = float("nan")
    sd["model.norm.bias"][0] = float("inf")
    torch.save({"state_dict": sd}, tmp_path / "broken.ckpt")
    err = _cli_error(capsys, ["import", "--model", "xmag_vitb14", "--weights", str(tmp_path / "broken.ckpt"),
                              "--out", str(tmp_path / "ck")])
    assert "broken.ckpt: 2 tensors hold NaN or Inf: model.blocks.1.attn.qkv.weight, model.norm.bias" in err
    assert not (tmp_path / "ck").exists()
