"""Survival losses in JAX: Cox partial likelihood (Breslow ties) and "recurrence within T months" cross-entropy.

Shapes: `risk`, `logit`, `time` (months), `event` (0/1), `valid` (False for batch padding) are all `[B]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cox_nll(risk: jax.Array, time: jax.Array, event: jax.Array, valid: jax.Array) -> jax.Array:
    """Negative Cox partial log-likelihood per event, Breslow's handling of ties.

    -1/E * sum_{i: event_i} [risk_i - log sum_{j: time_j >= time_i} exp(risk_j)] over the valid slides, E the
    number of events (0 when the batch has none: no gradient, not NaN).
    """
    risk = risk.astype(jnp.float32)
    at_risk = (time[None, :] >= time[:, None]) & valid[None, :]  # [i, j]: j is in i's risk set
    log_denominator = jax.nn.logsumexp(jnp.where(at_risk, risk[None, :], -jnp.inf), axis=1)
    observed = (event > 0) & valid
    terms = jnp.where(observed, risk - jnp.where(observed, log_denominator, 0.0), 0.0)
    return -terms.sum() / jnp.maximum(observed.sum(), 1)


def binary_within(time: jax.Array, event: jax.Array, months: float) -> tuple[jax.Array, jax.Array]:
    """(label, known) of "recurrence within `months`": label 1 if an event at time <= months; known is False for
    slides censored before `months` (their status at `months` is unknown)."""
    label = (event > 0) & (time <= months)
    known = label | (time > months)
    return label, known


def binary_bce(logit: jax.Array, time: jax.Array, event: jax.Array, valid: jax.Array, months: float) -> jax.Array:
    """Mean sigmoid cross-entropy of "recurrence within `months`" over valid slides whose status is known."""
    label, known = binary_within(time, event, months)
    use = known & valid
    losses = jnp.logaddexp(0.0, logit) - label * logit  # -[y log s(x) + (1 - y) log(1 - s(x))]
    return jnp.where(use, losses, 0.0).sum() / jnp.maximum(use.sum(), 1)
