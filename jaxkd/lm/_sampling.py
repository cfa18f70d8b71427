"""Autoregressive sampling from a causal language model, fixed-shape and jittable.

:func:`sample` extends right-padded prompts by ``max_new_tokens`` tokens each
(greedy, or drawn at a temperature after optional top-k and top-p filtering),
stopping a row at its first end-of-sequence token. The output has a fixed
shape, so the whole loop compiles once under ``jax.jit``.

There is no key/value cache: every step runs the model's full forward pass on
the whole ``[batch, prompt_len + max_new_tokens]`` buffer and reads the logits
at each row's last real position. That costs ``max_new_tokens`` full forward
passes, which is fine for the small bundled models (and exact for any causal
model: positions after the one read never influence it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import validation as v

__all__ = ["sample", "top_k_filter", "top_p_filter"]

Array = jax.Array


def top_k_filter(logits: Array, top_k: int) -> Array:
  """Keeps the ``top_k`` largest logits of the last axis; the rest become -inf.

  Logits tied with the ``top_k``-th largest are all kept, so a row with ties
  can keep more than ``top_k`` entries.

  Args:
    logits: Floating logits ``[..., vocab]``.
    top_k: How many to keep, ``1 <= top_k <= vocab`` (a Python int).

  Returns:
    The filtered logits, same shape and dtype.

  Raises:
    TypeError: If ``top_k`` is not a Python int.
    ValueError: If ``top_k`` lies outside ``[1, vocab]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd.lm import _sampling
    >>> print(_sampling.top_k_filter(jnp.array([1.0, 3.0, 2.0, 0.0]), 2))
    [-inf  3.  2. -inf]
  """
  vocab = logits.shape[-1]
  top_k = v.check_int("top_k", top_k, minimum=1)
  if top_k > vocab:
    raise ValueError(
        f"`top_k`={top_k} exceeds the vocabulary size {vocab}."
    )
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def _check_top_p(top_p: Any) -> None:
  concrete = v.concrete_value(top_p)
  if concrete is not None and not (concrete.ndim == 0 and 0 < concrete <= 1):
    raise ValueError(f"`top_p` must be a scalar in (0, 1], got {top_p!r}.")


def top_p_filter(logits: Array, top_p: Any) -> Array:
  r"""Nucleus filter: keeps the smallest set of tokens with mass >= ``top_p``.

  Tokens are ranked by decreasing probability (ties broken by index); token
  ``i`` of the ranking is kept when the mass of the tokens ranked before it is
  below ``top_p``, so the most likely token is always kept and the kept mass is
  at least ``top_p``. The others become ``-inf``.

  Args:
    logits: Floating logits ``[..., vocab]`` (already divided by the
      temperature).
    top_p: The mass :math:`p \in (0, 1]`; a scalar (may be traced).

  Returns:
    The filtered logits, same shape and dtype.

  Raises:
    ValueError: If a concrete ``top_p`` lies outside ``(0, 1]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd.lm import _sampling
    >>> logits = jnp.log(jnp.array([0.1, 0.5, 0.05, 0.35]))
    >>> print(jnp.isfinite(_sampling.top_p_filter(logits, 0.7)))
    [False  True False  True]

  References:
    Holtzman, Buys, Du, Forbes and Choi, `The Curious Case of Neural Text
    Degeneration <https://arxiv.org/abs/1904.09751>`_, 2020.
  """
  _check_top_p(top_p)
  order = jnp.argsort(-logits, axis=-1, stable=True)
  probs = jax.nn.softmax(
      jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1
  )
  # Exclusive cumulative mass, formed as a shifted cumsum (not cumsum - p,
  # whose rounding can push the first token's mass above zero).
  mass_before = jnp.cumsum(probs, axis=-1)[..., :-1]
  mass_before = jnp.concatenate(
      [jnp.zeros_like(probs[..., :1]), mass_before], axis=-1
  )
  keep_sorted = mass_before < jnp.asarray(top_p, jnp.float32)
  inverse = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def _prompt_lengths(prompt_tokens: Array, prompt_lengths: Any) -> Array:
  """``[batch]`` int32 lengths from lengths or a ``[batch, P]`` prefix mask."""
  batch, prompt_len = prompt_tokens.shape
  lengths = jnp.asarray(prompt_lengths)
  if lengths.dtype == jnp.bool_:
    if lengths.shape != (batch, prompt_len):
      raise ValueError(
          "A boolean prompt mask must have the prompt's shape"
          f" {(batch, prompt_len)}, got {tuple(lengths.shape)}."
      )
    concrete = v.concrete_value(prompt_lengths)
    if concrete is not None and np.any(concrete[:, 1:] & ~concrete[:, :-1]):
      raise ValueError(
          "The prompt mask must be a prefix mask (right-padded prompts:"
          " True then False in every row)."
      )
    return jnp.sum(lengths, axis=-1, dtype=jnp.int32)
  if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != (
      batch,
  ):
    raise ValueError(
        "`prompt_lengths` must be integer lengths [batch] or a boolean"
        f" prompt mask [batch, prompt_len], got shape {tuple(lengths.shape)}"
        f" and dtype {lengths.dtype} for prompts of shape"
        f" {(batch, prompt_len)}."
    )
  concrete = v.concrete_value(prompt_lengths)
  if concrete is not None and (
      np.any(concrete < 1) or np.any(concrete > prompt_len)
  ):
    raise ValueError(
        f"`prompt_lengths` must lie in [1, {prompt_len}], got {concrete}."
    )
  return lengths.astype(jnp.int32)


def sample(
    model: Any,
    params: Any,
    state: Any,
    prompt_tokens: Any,
    prompt_lengths: Any,
    *,
    key: Array,
    max_new_tokens: int,
    temperature: Any = 1.0,
    top_k: int | None = None,
    top_p: Any = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[Array, Array]:
  """Extends each prompt by up to ``max_new_tokens`` sampled tokens.

  Row ``b``'s prompt is ``prompt_tokens[b, :length_b]`` (right-padded); its
  new tokens go to positions ``length_b, ..., length_b + max_new_tokens - 1``
  of the output. Each new token is drawn from the model's next-token logits
  at the previous position: divided by ``temperature``, filtered by
  :func:`top_k_filter` then :func:`top_p_filter`, then sampled. Temperature
  0 is greedy decoding (argmax). After a row's first generated ``eos_id``
  (which is kept), its later positions hold ``pad_id`` and are masked out.
  Step ``s`` draws with ``jax.random.fold_in(key, s)``: the same key gives the
  same tokens.

  Every step recomputes the full forward pass over the whole output buffer
  (no key/value cache), which is acceptable for the small bundled models.
  The function is jittable (close over ``model`` and the Python-int
  arguments); ``temperature`` and ``top_p`` may be traced. A traced length
  outside ``[1, prompt_len]`` gives that row an all-``False`` mask and
  ``pad_id`` everywhere.

  Args:
    model: A :class:`~jaxkd.models.Model` or its ``apply(params, state, x,
      *, train, rng) -> (logits, features, state)`` function for a causal LM
      whose logits are ``[batch, length, vocab]``.
    params: The model's parameters.
    state: The model's state (``{}`` for the bundled LMs).
    prompt_tokens: Integer prompts ``[batch, prompt_len]``, right-padded.
    prompt_lengths: Integer lengths ``[batch]`` in ``[1, prompt_len]``, or a
      boolean prefix mask ``[batch, prompt_len]``.
    key: PRNG key (unused when greedy).
    max_new_tokens: Tokens to generate per row, an int >= 0.
    temperature: Softmax temperature >= 0; 0 is greedy.
    top_k: Keep only the ``top_k`` most likely tokens (``None``: all).
    top_p: Nucleus mass in ``(0, 1]`` (``None``: no nucleus filter).
    eos_id: End-of-sequence token that stops a row (``None``: never stop).
    pad_id: Token written after EOS and in unused trailing positions.

  Returns:
    ``(tokens, mask)``, both ``[batch, prompt_len + max_new_tokens]``:
    int32 tokens (prompt, generated tokens, then ``pad_id``), and a boolean
    mask that is ``True`` on the prompt and the generated tokens up to and
    including the first EOS.

  Raises:
    TypeError: If ``model`` is not callable or has no ``apply``, or a count
      or token id is not a Python int.
    ValueError: For bad shapes, dtypes or hyper-parameters (named).
  """
  apply: Callable[..., Any] = getattr(model, "apply", model)
  if not callable(apply):
    raise TypeError(
        "`model` must be a jaxkd Model or an apply function, got"
        f" {type(model).__name__}."
    )
  max_new_tokens = v.check_int("max_new_tokens", max_new_tokens, minimum=0)
  pad_id = v.check_int("pad_id", pad_id, minimum=0)
  if eos_id is not None:
    eos_id = v.check_int("eos_id", eos_id, minimum=0)
  if top_k is not None:
    v.check_int("top_k", top_k, minimum=1)
  if top_p is not None:
    _check_top_p(top_p)
  concrete_temperature = v.concrete_value(temperature)
  if concrete_temperature is not None and not (
      concrete_temperature.ndim == 0 and concrete_temperature >= 0
  ):
    raise ValueError(
        f"`temperature` must be a scalar >= 0, got {temperature!r}."
    )
  greedy = concrete_temperature is not None and concrete_temperature == 0
  prompt = jnp.asarray(prompt_tokens)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(
        "`prompt_tokens` must be integer tokens [batch, prompt_len], got"
        f" shape {tuple(prompt.shape)} and dtype {prompt.dtype}."
    )
  if prompt.shape[1] < 1:
    raise ValueError("`prompt_tokens` must hold at least one position.")
  lengths = _prompt_lengths(prompt, prompt_lengths)
  return _decode(
      apply, params, state, prompt.astype(jnp.int32), lengths, key,
      jnp.asarray(temperature, jnp.float32),
      None if top_p is None else jnp.asarray(top_p, jnp.float32),
      max_new_tokens=max_new_tokens, greedy=bool(greedy), top_k=top_k,
      eos_id=eos_id, pad_id=pad_id,
  )


# Compiled once per (apply function, shapes, static options): repeated calls
# with the same model reuse the executable, and inside an outer ``jax.jit``
# this is just inlined.
@functools.partial(
    jax.jit,
    static_argnames=(
        "apply", "max_new_tokens", "greedy", "top_k", "eos_id", "pad_id"
    ),
)
def _decode(
    apply, params, state, prompt, lengths, key, temperature, top_p, *,
    max_new_tokens, greedy, top_k, eos_id, pad_id,
):
  """The decoding loop of :func:`sample` on checked arguments."""
  prompt_len = prompt.shape[1]
  total = prompt_len + max_new_tokens
  positions = jnp.arange(total)[None, :]
  valid = (lengths >= 1) & (lengths <= prompt_len)
  in_prompt = (positions < lengths[:, None]) & valid[:, None]
  padded = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))
  tokens = jnp.where(in_prompt, padded, jnp.int32(pad_id))

  def choose(logits: Array, step_key: Array) -> Array:
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
      return best
    positive = temperature > 0
    scaled = logits / jnp.where(positive, temperature, jnp.float32(1))
    if top_k is not None:
      scaled = top_k_filter(scaled, top_k)
    if top_p is not None:
      scaled = top_p_filter(scaled, top_p)
    drawn = jax.random.categorical(step_key, scaled, axis=-1)
    return jnp.where(positive, drawn.astype(jnp.int32), best)

  def step(index, carry):
    tokens, mask, done = carry
    logits = apply(params, state, tokens, train=False, rng=None)[0]
    write = lengths + index
    read = jnp.clip(write - 1, 0, total - 1)
    next_logits = jnp.take_along_axis(
        logits, read[:, None, None], axis=1
    )[:, 0]
    new = choose(next_logits, jax.random.fold_in(key, index))
    new = jnp.where(done, jnp.int32(pad_id), new)
    here = positions == write[:, None]
    tokens = jnp.where(here, new[:, None], tokens)
    mask = mask | (here & ~done[:, None])
    if eos_id is not None:
      done = done | (new == eos_id)
    return tokens, mask, done

  tokens, mask, _ = jax.lax.fori_loop(
      0, max_new_tokens, step, (tokens, in_prompt, ~valid)
  )
  return tokens, mask
