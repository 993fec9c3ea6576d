"""The pair record: byte round trip, TFDS's own decoder, shard discovery."""
import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from xmag_jax.formats import pair_records


def _jpeg(px: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (px, px, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _pair(i: int = 0) -> dict:
    return dict(image_5x=_jpeg(224, i), image_20x=_jpeg(896, i), slide_id=f"slide-{i}", x=448 * i, y=7,
                mpp_5x=2.0, mpp_20x=0.5, tissue_fraction=0.75)


def test_round_trip():
    pair = _pair(3)
    assert pair_records.decode_pair(pair_records.encode_pair(pair)) == pair


def test_float_fields_are_float32():
    pair = dict(_pair(), mpp_5x=2.016, tissue_fraction=0.3)
    out = pair_records.decode_pair(pair_records.encode_pair(pair))
    assert out["mpp_5x"] == pytest.approx(2.016, rel=1e-6) and out["tissue_fraction"] == pytest.approx(0.3, rel=1e-6)


def test_rejects_bad_fields():
    with pytest.raises(ValueError, match="missing fields \\['tissue_fraction'\\]"):
        pair_records.encode_pair({k: v for k, v in _pair().items() if k != "tissue_fraction"})
    with pytest.raises(ValueError, match="image_5x.*JPEG"):
        pair_records.encode_pair(dict(_pair(), image_5x=b"\x89PNG not a jpeg"))


def _write_shard(path: str, n: int) -> None:
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(n):
        writer.write(pair_records.encode_pair(_pair(i)))
    writer.close()


def test_shard_paths_ignores_temp_and_rejects_incomplete(tmp_path):
    for i in range(2):
        _write_shard(str(tmp_path / pair_records.shard_name("train", i, 2)), 1)
    (tmp_path / (pair_records.shard_name("train", 0, 3) + ".tmp-123")).write_bytes(b"partial")
    (tmp_path / pair_records.shard_name("val", 1, 2)).write_bytes(b"")
    assert [os.path.basename(p) for p in pair_records.shard_paths(tmp_path, "train")] == [
        "xmag_pairs-train.array_record-00000-of-00002", "xmag_pairs-train.array_record-00001-of-00002"]
    with pytest.raises(ValueError, match="incomplete shard set for split 'val'"):
        pair_records.shard_paths(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="no shards for split 'test'"):
        pair_records.shard_paths(tmp_path, "test")


def test_tfds_decodes_records(tmp_path):
    shard = tmp_path / pair_records.shard_name("train", 0, 1)
    _write_shard(str(shard), 2)
    split = tfds.core.SplitInfo(name="train", shard_lengths=[2], num_bytes=shard.stat().st_size,
                                filename_template=None)
    tfds.folder_dataset.write_metadata(data_dir=tmp_path, features=pair_records.features(), split_infos=[split],
                                       check_data=False)
    source = tfds.builder_from_directory(tmp_path).as_data_source(split="train")
    assert len(source) == 2
    example = source[1]
    assert example["image_5x"].shape == (224, 224, 3) and example["image_20x"].shape == (896, 896, 3)
    assert example["slide_id"] == b"slide-1" and example["x"] == 448
