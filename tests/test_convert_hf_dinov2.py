"""Phikon-v2's release format (a transformers Dinov2Model) -> import -> the CLS that transformers computes.

A random-init Dinov2Model at Phikon-v2's width (1024, 16 heads, patch 16, 224 px; depth 2), written by
`save_pretrained` (the hub's key names) and as its in-memory `state_dict()` (transformers >= 5 names).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from xmag_jax.bench.parity import randomize_init_constants_
from xmag_jax.convert import hf_dinov2, import_timm, read_state_dict
from xmag_jax.models import embed, get_arch

DEPTH = 2
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    vit = get_arch("phikon_v2").vit
    config = Dinov2Config(hidden_size=vit.embed_dim, num_hidden_layers=DEPTH, num_attention_heads=vit.num_heads,
                          mlp_ratio=4, patch_size=vit.patch_size, image_size=vit.img_size, layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    randomize_init_constants_(model, 0)
    return model


def _hf_cls(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    return out.last_hidden_state[:, 0].numpy()


@pytest.mark.parametrize("layout", ["save_pretrained", "state_dict", "prefixed"])
def test_import_computes_the_transformers_cls(hf_model, layout, tmp_path):
    if layout == "save_pretrained":
        hf_model.save_pretrained(tmp_path)
    else:
        prefix = "dinov2." if layout == "prefixed" else ""
        tensors = {prefix + k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if layout == "prefixed":  # as a Dinov2ForImageClassification saves it: the backbone under dinov2., a head
            tensors["classifier.weight"] = torch.zeros(2, 2 * hf_model.config.hidden_size)
        save_file(tensors, str(tmp_path / "model.safetensors"))
    keys = set(read_state_dict(tmp_path / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in keys) == (layout == "save_pretrained")
    model, _ = import_timm("phikon_v2", tmp_path / "model.safetensors", tmp_path / "ckpt", depth=DEPTH)
    arch = get_arch("phikon_v2", depth=DEPTH)
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(embed(arch, model(images))), _hf_cls(hf_model, images), rtol=TOL, atol=TOL)


def test_keys_without_a_timm_counterpart_are_listed(hf_model):
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    state["encoder.layer.0.mlp.weights_in.weight"] = state.pop("encoder.layer.0.mlp.fc1.weight")  # a SwiGLU Dinov2
    del state["encoder.layer.1.attention.v_proj.bias"]
    with pytest.raises(ValueError, match=r"w\.safetensors: .*'encoder\.layer\.0\.mlp\.weights_in\.weight'.*"
                                         r"encoder\.layer\.1 bias: has \['k', 'q'\]"):
        hf_dinov2.to_timm(state, source="w.safetensors")


def test_timm_state_dicts_are_left_to_the_timm_mapping():
    assert not hf_dinov2.is_hf_dinov2({"patch_embed.proj.weight": np.zeros((4, 3, 16, 16))})
