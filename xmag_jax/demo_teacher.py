"""A stand-in 20x teacher for the demo: `vit_test_teacher` trained to tell the synthetic texture classes apart.

    python -m xmag_jax.demo_teacher --pairs PAIRS_DIR --labels LABELS_CSV --out CKPT [--steps N] [--seed S]

XMAG distills a pathology foundation model (UNI2-h, Virchow2, ...) whose 20x features already separate
tissue types. Those weights cannot be downloaded everywhere (not in CI, not here), and a random-init
teacher knows nothing, so distilling it teaches the student nothing. This module makes an honest
substitute: the tiny teacher architecture plus a linear head, trained with labels for a few dozen steps
on the 20x tiles (0.5 µm/px, 224 px, cut 4x4 from each 896 px region) of the pair shards' `train` split,
each tile taking its slide's label from `LABELS_CSV`. The teacher without its head is saved with
`models.checkpoint.save_model`, ready for `xmag_jax.train --config.teacher.checkpoint=CKPT`.

It is supervised on the demo's own slides (the `train` split), so it is a stand-in for "a model that knows
these textures at 20x", not a foundation model; the student it teaches never sees a label.
"""

from __future__ import annotations

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from PIL import Image

from xmag_jax import cli, errors, geometry
from xmag_jax.data import augment
from xmag_jax.data import pairs as pair_data
from xmag_jax.eval import features as eval_features
from xmag_jax.formats import pair_records
from xmag_jax.models import checkpoint, registry
from xmag_jax.models.vit import VisionTransformer
from xmag_jax.wsi import tissue

ARCH_NAME = "vit_test_teacher"
# LayerScale starts at 1e-5 in the registry (DINOv2 practice for long runs), which leaves the blocks inert for
# a few dozen steps; training starts it at 1 instead. `init_values` only initialises `gamma`, so the trained
# parameters fit the registry architecture unchanged (see `registry_model`).
LAYER_SCALE_INIT = 1.0
COSINE_SCALE = 4.0


MIN_TISSUE = 0.5  # a 20x tile of mostly glass carries its slide's label but none of its texture


def load_tiles(pairs_dir: str, split: str, labels: dict[str, str], classes: list[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 20x tiles of `split` that are at least `MIN_TISSUE` tissue, with their slides' labels:
    (`uint8 [M, 224, 224, 3]`, `int32 [M]`, class names). Raises ValueError naming slides `labels` lacks."""
    source = grain.sources.ArrayRecordDataSource(pair_records.shard_paths(pairs_dir, split))
    tiles, names = [], []
    for index in range(len(source)):
        raw = source[index]
        _, region = pair_data.decode_images(raw, index)
        tiles.append(pair_data.cut_tiles(region))
        names.append(pair_records.decode_pair(raw)["slide_id"])
    missing = sorted(set(names) - set(labels))
    if missing:
        raise ValueError(f"labels CSV lacks slide(s) {missing} of the {split!r} pairs in {pairs_dir}")
    y, found = eval_features.encode_labels([labels[n] for n in names])
    if classes is not None:
        y = np.array([classes.index(found[i]) for i in y], np.int32)
    tiles_all, y_all = np.concatenate(tiles), np.repeat(y, geometry.FIELD_TILES)
    keep = tissue_fraction(tiles_all) >= MIN_TISSUE
    return tiles_all[keep], y_all[keep], classes or found


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Fraction of each tile's pixels `[N, H, W, 3]` uint8 whose HSV saturation marks tissue, `[N]`
    (the threshold of `xmag_jax.wsi.tissue`'s mask, without its Otsu step: a tile may be all tissue)."""
    saturation = np.stack([np.asarray(Image.fromarray(t).convert("HSV"))[..., 1] for t in tiles])
    return (saturation > tissue.MaskParams().min_saturation).mean(axis=(1, 2))


class TeacherWithHead(nnx.Module):
    """The teacher ViT and a cosine classifier on its embedding (`registry.embed`): logits `[B, classes]`.

    Logits are `COSINE_SCALE * cos(embedding, class weight)`: the classes must differ in the embedding's
    direction, which is what the distillation's cosine losses transfer (a plain linear head can separate them
    along one small component that a cosine loss barely sees).
    """

    def __init__(self, n_classes: int, *, rngs: nnx.Rngs):
        self.arch = registry.get_arch(ARCH_NAME)
        self.vit = registry.create_model(ARCH_NAME, rngs=rngs, init_values=LAYER_SCALE_INIT)
        self.head = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (self.arch.embed_dim, n_classes)))

    def embed(self, images_uint8: jax.Array) -> jax.Array:
        """Teacher embeddings `[B, E]` of uint8 tiles `[B, 224, 224, 3]`."""
        return registry.embed(self.arch, self.vit(registry.normalize(self.arch, images_uint8)))

    def __call__(self, images_uint8: jax.Array) -> jax.Array:
        e = self.embed(images_uint8)
        w = self.head[...]
        e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        return COSINE_SCALE * e @ (w / jnp.linalg.norm(w, axis=0, keepdims=True))


@nnx.jit
def train_step(model: TeacherWithHead, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> jax.Array:
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: TeacherWithHead, images: jax.Array) -> jax.Array:
    return jnp.argmax(model(images), axis=-1)


def accuracy(model: TeacherWithHead, tiles: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Balanced accuracy of the head on `tiles` (fixed-size batches, the last one padded)."""
    preds = []
    for i in range(0, len(tiles), batch):
        chunk = tiles[i:i + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        preds.append(np.asarray(predict(model, padded))[:len(chunk)])
    pred = np.concatenate(preds)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def train_teacher(tiles: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int, batch: int, lr: float,
                  seed: int) -> TeacherWithHead:
    """`steps` AdamW updates (cosine decay from `lr`) on random D4-augmented batches of `batch` tiles."""
    model = TeacherWithHead(n_classes, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        idx = rng.choice(len(tiles), batch, replace=False)
        images = np.stack([augment.apply_d4(tiles[i], int(d)) for i, d in zip(idx, rng.integers(0, 8, batch))])
        loss = float(train_step(model, optimizer, images, y[idx]))
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"teacher step {step}/{steps}: loss {loss:.4f}", flush=True)
    return model


def registry_model(trained: TeacherWithHead) -> VisionTransformer:
    """The trained teacher ViT as the registry architecture (`init_values` back to the registry's)."""
    model = registry.create_model(ARCH_NAME, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(trained.vit, nnx.Param))
    return model


PROG = "python -m xmag_jax.demo_teacher"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("pairs", None, "pair dataset folder from data_prep.tile_pairs", flag_values=fv)
    flags.DEFINE_string("labels", None, "CSV slide_id,label (xmag_jax.wsi.synthetic's labels.csv)", flag_values=fv)
    flags.DEFINE_string("out", None, "teacher checkpoint directory to write (must not exist)", flag_values=fv)
    flags.DEFINE_integer("steps", 80, "optimizer updates", flag_values=fv)
    flags.DEFINE_integer("batch", 16, "20x tiles per update", flag_values=fv)
    flags.DEFINE_float("lr", 1e-2, "peak learning rate (warmup, cosine decay, clipping at norm 1)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the init and the tile order", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("pairs", "labels", "out"))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if args.steps < 1 or args.batch < 1:
        raise errors.UserError("--steps and --batch must be >= 1")
    start = time.perf_counter()
    try:
        labels = eval_features.read_labels(args.labels)
        tiles, y, classes = load_tiles(args.pairs, "train", labels)
    except (OSError, ValueError) as e:
        raise errors.UserError(str(e)) from e
    if len(classes) < 2:
        raise errors.UserError(f"the train pairs of {args.pairs} have only the class(es) {classes}")
    batch = min(args.batch, len(tiles))
    print(f"training {ARCH_NAME} + linear head on {len(tiles)} 20x tiles, classes {classes}", flush=True)
    model = train_teacher(tiles, y, len(classes), steps=args.steps, batch=batch, lr=args.lr, seed=args.seed)
    print(f"teacher balanced accuracy on its train tiles: {accuracy(model, tiles, y, batch):.3f}")
    try:
        val_tiles, val_y, _ = load_tiles(args.pairs, "val", labels, classes)
        print(f"teacher balanced accuracy on the held-out val slides' tiles: "
              f"{accuracy(model, val_tiles, val_y, batch):.3f}")
    except FileNotFoundError:
        pass
    path = checkpoint.save_model(args.out, registry_model(model), ARCH_NAME)
    print(f"wrote the stand-in teacher to {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)
