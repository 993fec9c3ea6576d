"""Student and teacher features of tile pairs (data_prep shards), the arrays `eval fidelity` scores.

For each pair: the student's embedding of the 5x tile `[Es]` and its tokens mean-pooled to the 4x4 blocks
`[16, Ds]` (`distill.losses.student_tile_blocks`); the teacher's embedding of each of the 16 20x tiles
`[16, Et]` (row-major, `data.pairs.cut_tiles`) and the mean of each tile's patch tokens `[16, Dt]` (the
teacher's token mosaic pooled to 4x4). Bad records are skipped and counted. With a teacher-target cache
(`python -m xmag_jax.teacher_cache` over the same split) the teacher's features are read from it (the
identity state; tokens as the 4x4 block means of the cached student-grid pooling, the same numbers) instead
of running the teacher.
"""

from __future__ import annotations

import numpy as np
import tqdm
from absl import flags

from xmag_jax import encoders, geometry
from xmag_jax.data import pairs
from xmag_jax.distill import losses
from xmag_jax.eval import features as feats
from xmag_jax.formats import pair_records
from xmag_jax.teacher_cache import reader
from xmag_jax.teacher_cache import records as cache_records


def pair_arrays(source, indices: np.ndarray, student: encoders.Encoder, teacher: encoders.Encoder | None,
                batch: int, progress: bool = True, cache: reader.TargetCache | None = None) -> dict[str, np.ndarray]:
    """`student [N, Es]`, `student_tiles [N, 16, Ds]`, `teacher_tiles [N, 16, Et]`, `teacher_tokens
    [N, 16, Dt]`, `groups [N]` (slide ids)
    of the records `source[i]` for i in `indices`; batches have a fixed size (the last is zero-padded)."""
    out: dict[str, list] = {"student": [], "student_tiles": [], "teacher_tiles": [], "teacher_tokens": [], "groups": []}
    bad = 0
    images_5x, tiles_20x, cached = [], [], []

    def flush() -> None:
        n = len(images_5x)
        x5 = np.zeros((batch, *images_5x[0].shape), np.uint8)
        x5[:n] = images_5x
        x20 = None
        if cache is None:
            x20 = np.zeros((batch, *tiles_20x[0].shape), np.uint8)
            x20[:n] = tiles_20x
        emb, tokens = student.forward_with_tokens(x5)
        out["student"].append(np.asarray(emb)[:n])
        out["student_tiles"].append(np.asarray(losses.student_tile_blocks(tokens))[:n])
        if cache is not None:
            out["teacher_tiles"].append(np.stack([c["tiles"] for c in cached]))
            if cache.has_tokens:
                out["teacher_tokens"].append(np.asarray(losses.student_tile_blocks(
                    np.stack([c["tokens"] for c in cached]))))
        else:
            teacher_emb, teacher_patches = teacher.forward_with_tokens(x20.reshape(-1, *x20.shape[2:]))
            out["teacher_tiles"].append(np.asarray(teacher_emb).reshape(batch, geometry.FIELD_TILES, -1)[:n])
            tile_tokens = np.asarray(teacher_patches.mean(axis=(1, 2)))
            out["teacher_tokens"].append(tile_tokens.reshape(batch, geometry.FIELD_TILES, -1)[:n])
        images_5x.clear()
        tiles_20x.clear()
        cached.clear()

    for i in tqdm.tqdm(indices, unit="pair", disable=not progress, desc="pair features"):
        raw = source[int(i)]
        try:
            image_5x, image_20x = pairs.decode_images(raw, int(i), with_20x=cache is None)
            if cache is not None:
                cached.append(cache.get(int(i), 0))
        except pairs.BadRecordError as e:
            bad, latest = bad + 1, e
            continue
        out["groups"].append(pair_records.decode_pair(raw)["slide_id"])
        images_5x.append(image_5x)
        if cache is None:
            tiles_20x.append(pairs.cut_tiles(image_20x))
        if len(images_5x) == batch:
            flush()
    if images_5x:
        flush()
    if not out["student"]:
        raise feats.EvalInputError(f"no decodable pair among {len(indices)} records ({bad} bad)")
    if bad:
        print(f"skipped {bad} bad record(s) of {len(indices)} (the latest: {latest})")
    arrays = {k: np.concatenate(v) for k, v in out.items() if k != "groups" and v}
    arrays["groups"] = np.array(out["groups"])
    return arrays


def from_args(args: flags.FlagValues) -> dict[str, np.ndarray]:
    """The arrays for `eval fidelity --pairs DIR` (encoders from the --student_* / --teacher_* flags)."""
    try:
        paths = pair_records.shard_paths(args.pairs, args.split)
    except (FileNotFoundError, ValueError) as e:  # no or an incomplete shard set
        raise feats.EvalInputError(str(e)) from e
    source = pairs.PairSource(paths)
    n = len(source)
    indices = np.arange(n)
    if n > args.max_pairs:
        indices = np.sort(np.random.default_rng(args.seed).choice(n, args.max_pairs, replace=False))
    cache = teacher = None
    try:
        student = encoders.load_encoder(checkpoint_dir=args.student_checkpoint, timm_dir=args.student_timm_dir)
        if not args.teacher_cache:
            teacher = encoders.load_encoder(checkpoint_dir=args.teacher_checkpoint, timm_dir=args.teacher_timm_dir,
                                            model=args.teacher, weights=args.teacher_weights,
                                            random_init=args.random_teacher)
    except (ValueError, FileNotFoundError) as e:  # a missing or contradictory encoder source
        raise feats.EvalInputError(str(e)) from e
    if args.teacher_cache:
        cache = reader.TargetCache(args.teacher_cache)
        source_meta = cache.meta["source"]
        if (source_meta["split"], source_meta["fingerprint"]) != (
                args.split, cache_records.source_fingerprint(args.pairs, args.split)["fingerprint"]):
            raise feats.EvalInputError(f"--teacher_cache {args.teacher_cache}: holds targets of {source_meta['dir']} "
                                       f"split {source_meta['split']!r}, not of --pairs {args.pairs} split "
                                       f"{args.split!r}")
        if 0 not in cache.states:
            raise feats.EvalInputError(f"--teacher_cache {args.teacher_cache}: has no identity state (states "
                                       f"{list(cache.states)})")
    return pair_arrays(source, indices, student, teacher, args.batch, cache=cache)
