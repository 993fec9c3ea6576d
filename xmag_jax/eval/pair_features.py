"""Student and teacher features of tile pairs (data_prep shards), the arrays `eval fidelity` scores.

For each pair: the student's embedding of the 5x tile `[Es]` and its tokens mean-pooled to the 4x4 blocks
`[16, Ds]` (`distill.losses.student_tile_blocks`); the teacher's embedding of each of the 16 20x tiles
`[16, Et]` (row-major, `data.pairs.cut_tiles`) and the mean of each tile's patch tokens `[16, Dt]` (the
teacher's token mosaic pooled to 4x4). Bad records are skipped and counted.
"""

from __future__ import annotations

import argparse

import numpy as np
import tqdm

from data_prep import records
from xmag_jax import encoders
from xmag_jax.data import pairs
from xmag_jax.distill import losses
from xmag_jax.eval import features as feats


def pair_arrays(source, indices: np.ndarray, student: encoders.Encoder, teacher: encoders.Encoder, batch: int,
                progress: bool = True) -> dict[str, np.ndarray]:
    """`student [N, Es]`, `student_tiles [N, 16, Ds]`, `teacher_tiles [N, 16, Et]`, `teacher_tokens
    [N, 16, Dt]`, `groups [N]` (slide ids)
    of the records `source[i]` for i in `indices`; batches have a fixed size (the last is zero-padded)."""
    out: dict[str, list] = {"student": [], "student_tiles": [], "teacher_tiles": [], "teacher_tokens": [], "groups": []}
    bad = 0
    images_5x, tiles_20x = [], []

    def flush() -> None:
        n = len(images_5x)
        x5 = np.zeros((batch, *images_5x[0].shape), np.uint8)
        x5[:n] = images_5x
        x20 = np.zeros((batch, *tiles_20x[0].shape), np.uint8)
        x20[:n] = tiles_20x
        emb, tokens = student.forward_with_tokens(x5)
        teacher_emb, teacher_patches = teacher.forward_with_tokens(x20.reshape(-1, *x20.shape[2:]))
        out["student"].append(np.asarray(emb)[:n])
        out["student_tiles"].append(np.asarray(losses.student_tile_blocks(tokens))[:n])
        out["teacher_tiles"].append(np.asarray(teacher_emb).reshape(batch, losses.FIELD_TILES, -1)[:n])
        tile_tokens = np.asarray(teacher_patches.mean(axis=(1, 2)))
        out["teacher_tokens"].append(tile_tokens.reshape(batch, losses.FIELD_TILES, -1)[:n])
        images_5x.clear()
        tiles_20x.clear()

    for i in tqdm.tqdm(indices, unit="pair", disable=not progress, desc="pair features"):
        raw = source[int(i)]
        try:
            image_5x, image_20x = pairs.decode_images(raw, int(i))
        except pairs.BadRecordError as e:
            bad, latest = bad + 1, e
            continue
        out["groups"].append(records.decode_pair(raw)["slide_id"])
        images_5x.append(image_5x)
        tiles_20x.append(pairs.cut_tiles(image_20x))
        if len(images_5x) == batch:
            flush()
    if images_5x:
        flush()
    if not out["student"]:
        raise feats.EvalInputError(f"no decodable pair among {len(indices)} records ({bad} bad)")
    if bad:
        print(f"skipped {bad} bad record(s) of {len(indices)} (the latest: {latest})")
    arrays = {k: np.concatenate(v) for k, v in out.items() if k != "groups"}
    arrays["groups"] = np.array(out["groups"])
    return arrays


def from_args(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The arrays for `eval fidelity --pairs DIR` (encoders from the --student-* / --teacher-* flags)."""
    try:
        paths = records.shard_paths(args.pairs, args.split)
    except (FileNotFoundError, ValueError) as e:  # no or an incomplete shard set
        raise feats.EvalInputError(str(e)) from e
    source = pairs.PairSource(paths)
    n = len(source)
    indices = np.arange(n)
    if n > args.max_pairs:
        indices = np.sort(np.random.default_rng(args.seed).choice(n, args.max_pairs, replace=False))
    try:
        student = encoders.load_encoder(checkpoint_dir=args.student_checkpoint, timm_dir=args.student_timm_dir)
        teacher = encoders.load_encoder(checkpoint_dir=args.teacher_checkpoint, timm_dir=args.teacher_timm_dir,
                                        model=args.teacher, weights=args.teacher_weights,
                                        random_init=args.random_teacher)
    except (ValueError, FileNotFoundError) as e:  # a missing or contradictory encoder source
        raise feats.EvalInputError(str(e)) from e
    return pair_arrays(source, indices, student, teacher, args.batch)
