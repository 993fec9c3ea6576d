"""Grain input pipeline: paired 5x/20x batches with shared augmentation; checkpointable iterator."""

from xmag_jax.data.augment import AugmentOptions
from xmag_jax.data.bad_records import BadRecordBudgetIterator, TooManyBadRecordsError
from xmag_jax.data.checkpointing import iterator_restore_args, iterator_save_args
from xmag_jax.data.distributed import global_batch
from xmag_jax.data.pipeline import build_dataset, make_iterator

__all__ = [
    "AugmentOptions",
    "BadRecordBudgetIterator",
    "TooManyBadRecordsError",
    "build_dataset",
    "global_batch",
    "iterator_restore_args",
    "iterator_save_args",
    "make_iterator",
]
