"""The demo's distillation (`make demo`): the stand-in 20x teacher into the tiny 5x student on synthetic slides, CPU.

    python -m xmag_jax.train --config configs/demo.py --workdir RUN \
        --config.data.dir=demo_out/pairs --config.teacher.checkpoint=demo_out/teacher

`configs/debug.py` with the loss and schedule that make a few hundred CPU steps teach the student the slides'
texture classes. Linear balanced accuracy of the student's 5x features on the 8-slide demo data (85 training pairs,
batch 8; its random init: 0.75-0.77):
- dual-level cosine loss, centred targets, 300-800 steps at lr 3e-4 to 3e-3: 0.55-0.65 (the loss stays on a plateau);
- the global cosine term alone: 0.51-0.67; global smooth-L1 plus the local cosine terms at weight 0.05: 0.63;
- the global term alone as smooth-L1 on centred targets (this config): the loss leaves its plateau after ~250 steps;
  the whole demo gives 0.959 (seed 0) and 0.912 (seed 1) against its random init's 0.745 and 0.673;
- that plus the local cosine terms at weight 0.002 (both fall meanwhile: tile 1.00 -> 0.59, token 0.90 -> 0.24): the
  whole demo gives 0.970 at seed 0, but at seed 1 the global loss stays near its plateau (0.743, kNN 0.479 against
  the random init's 0.650), so the demo leaves the local terms out. On the shared backbone the cosine terms'
  gradients outweigh smooth-L1's many times over (losses ~1 against ~0.1), and the local targets mostly tell tissue
  from glass (98 % of the token targets' variance lies on one direction, 1 % of it between the classes).
The centred global target is nearly one-dimensional (98 % of its variance on one direction, 75 % of the variance
between the classes). A likely reason the cosine fails on it: it weighs a target near the centre, whose direction is
noise, as much as one far from it, while smooth-L1 follows the target's size.
"""

import ml_collections

from xmag_jax import config as schema

debug = schema.load_sibling(__file__, "debug")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = debug.get_config(arg)
    c.batch_size = 8
    c.total_steps = 400
    c.teacher.allow_random_teacher = False
    c.loss.mode = "global_only"
    c.loss.global_weight = 0.0
    c.loss.global_smooth_l1_weight = 1.0
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10
    c.log_every = 50
    c.checkpoint.every = 100
    return c
