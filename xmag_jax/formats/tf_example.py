"""`tf.train.Example` bytes through TFDS's own serializer and parser (no TensorFlow needed): the record codec that
the ArrayRecord formats (`pair_records`, `bag_records`, `teacher_cache.records`) share."""

from __future__ import annotations

from typing import Any

from tensorflow_datasets.core import example_parser, example_serializer
from tensorflow_datasets.core import features as tfds_features


class ExampleCodec:
    """Encodes a dict of one `FeaturesDict` to bytes and parses bytes back to its raw numpy values."""

    def __init__(self, features: tfds_features.FeaturesDict):
        self.features = features
        info = features.get_serialized_info()
        self._serializer = example_serializer.ExampleSerializer(info)
        self._parser = example_parser.ExampleParserNp(info)

    def encode(self, example: dict[str, Any]) -> bytes:
        return self._serializer.serialize_example(self.features.encode_example(example))

    def decode(self, data: bytes) -> dict[str, Any]:
        """The raw parsed values: bytes fields as bytes/numpy bytes, scalars as numpy scalars (no image decode)."""
        return self._parser.parse_example(data)


def check_jpeg(where: str, data: Any) -> bytes:
    """`data` as bytes if it is JPEG (starts with the SOI marker and a segment), else ValueError naming `where`."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:3]) != b"\xff\xd8\xff":
        raise ValueError(f"{where}: expected JPEG bytes, got {type(data).__name__}")
    return bytes(data)
