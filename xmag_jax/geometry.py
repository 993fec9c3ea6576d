"""The XMAG pair geometry, defined once for every layer (data prep, records, input pipeline, losses, embedding).

One 5x tile of TILE_PX px at MPP_5X µm/px covers the same tissue field as FIELD_SIDE x FIELD_SIDE = FIELD_TILES
20x tiles of TILE_PX px at MPP_20X µm/px, read together as one REGION_20X_PX px region: 224 px at 2.0 µm/px
(448 µm) and 4 x 4 tiles of 224 px at 0.5 µm/px (`[16, 224, 224, 3]`, cut from an 896 px region).
Plain numbers, importable without JAX or TFDS.
"""

TILE_PX = 224  # side of every tile a model sees, px: the 5x tile and each 20x tile
FIELD_SIDE = 4  # the 5x tile's field is FIELD_SIDE x FIELD_SIDE tiles at 20x
FIELD_TILES = FIELD_SIDE * FIELD_SIDE  # 16 20x tiles per pair
REGION_20X_PX = FIELD_SIDE * TILE_PX  # 896 px: the 20x region of one field
MPP_5X = 2.0  # µm/px of the 5x tile (the student's input, ~5x)
MPP_20X = MPP_5X / FIELD_SIDE  # 0.5 µm/px of the 20x tiles (the teacher's input, ~20x)
