"""The survival run's config schema (`python -m xmag_jax.survival`): every key with its meaning and units.

`configs/celleconet.py` (real size) and `configs/celleconet_debug.py` (laptop CPU) start from `base_config()`
and only change values. Sizes aim at 5x slides (~700-1300 tiles of 224 px at 2 µm/px, 448 µm per tile) and
~500 slides.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.folds = 5  # k-fold CV by slide, stratified by event (or the CSV's `fold` column, whose values must be 0..k-1)
    # Models trained on the same folds; "clinical" is a lifelines Cox model on the CSV's covariates.
    c.models = ("spatial", "abmil", "transformer_no_pos", "clinical")

    c.data = ml_collections.ConfigDict()
    c.data.features = ""  # directory of TRIDENT-layout {slide_id}.h5 (features, coords[, tokens])
    c.data.clinical = ""  # CSV slide_id,time,event[,fold][,covariates...]; time in months, event 1 = recurrence
    c.data.covariates = ()  # covariate columns for the clinical model; () = every other column
    c.data.use_tokens = True  # words = the h5's pooled patch tokens when every file has them, else tile embeddings

    # The spatial model: words -> phrases (tile + 8 neighbours) -> sentence (slide) -> attention pooling.
    c.model = ml_collections.ConfigDict()
    c.model.dim = 256  # width of words, phrases and sentence (multiple of 4)
    c.model.phrase_layers = 2
    c.model.phrase_heads = 4
    c.model.sentence_layers = 2
    c.model.sentence_heads = 4
    c.model.mlp_ratio = 2.0
    c.model.dropout = 0.1
    c.model.global_attention_max_tiles = 2048  # above: attention only within window_um (neighbourhood attention)
    c.model.window_um = 2000.0  # µm, centre-to-centre distance a tile attends to on large slides
    c.model.pos_min_wavelength_um = 400.0  # µm, shortest wavelength of the 2-D positions (~ one 5x tile)
    c.model.pos_max_wavelength_um = 20000.0  # µm, longest (~ a slide's tissue extent)

    c.abmil = ml_collections.ConfigDict()  # baseline: xmag_jax.eval.mil.GatedABMIL with a Cox loss
    c.abmil.hidden = 512
    c.abmil.attn_dim = 256
    c.abmil.dropout = 0.25

    c.transformer_no_pos = ml_collections.ConfigDict()  # baseline: TransMIL-like, global attention, no positions
    c.transformer_no_pos.dim = 256
    c.transformer_no_pos.layers = 2
    c.transformer_no_pos.heads = 4
    c.transformer_no_pos.mlp_ratio = 2.0
    c.transformer_no_pos.dropout = 0.1

    c.train = ml_collections.ConfigDict()  # shared by the three neural models
    c.train.epochs = 40
    c.train.batch_size = 16  # slides per step: the Cox risk sets are within a batch
    c.train.eval_batch_size = 4
    c.train.max_tiles = 1024  # a crop of this many neighbouring tiles per slide and training step (all at evaluation)
    c.train.lr = 2e-4
    c.train.weight_decay = 1e-4
    c.train.val_fraction = 0.2  # of each training fold, held out to keep the epoch of best C-index (0: last epoch)

    c.loss = ml_collections.ConfigDict()
    # > 0: a second head for "recurrence within this many months" (censored before: left out)
    c.loss.binary_months = 0.0
    c.loss.binary_weight = 0.5

    c.clinical = ml_collections.ConfigDict()
    c.clinical.penalizer = 0.1  # lifelines CoxPHFitter ridge penalty

    c.eval = ml_collections.ConfigDict()
    c.eval.auc_months = 60.0  # T of the time-dependent AUC (scikit-survival cumulative_dynamic_auc)
    c.eval.subgroups = ()  # covariate columns for subgroup tables (<= 5 values: per value; else split at the median)
    return c
