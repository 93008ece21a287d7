"""Counter-based randomness for tasks: every draw is a pure function of a key.

torchmeta draws task inputs from NumPy's global RNG, so every data-loader worker
starts from the same copied state and produces the same inputs. fastmeta never
uses global RNG state for task content: each draw is a function of ``(dataset
seed, stream, task index, epoch, draw number)``. The same key gives the same
numbers in any process, with any number of workers; different keys give
independent streams.

Task content uses a counter-based generator (the SplitMix64 output function
applied to ``hash(key) + k * golden``), vectorised over a whole batch of tasks
with NumPy: a batch of 25 sine tasks costs microseconds, where building one
``numpy.random.Generator`` per task costs about 25 us each.
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Iterable, Sequence

import numpy as np

_MASK32 = 0xFFFF_FFFF
_MAX_SEED = 2**64

# Independent streams drawn from one dataset seed.
STREAM_PARAMS = 0  # per-task parameters (amplitude, phase, ...)
STREAM_INPUTS = 1  # per-task inputs and noise, redrawn each epoch
STREAM_SPLIT = 2  # which samples ClassSplitter puts in each split
STREAM_SAMPLER = 3  # order in which loaders visit tasks
STREAM_SAMPLE_TASK = 4  # MetaDataset.sample_task()


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` as a Python int in ``[0, 2**64)`` or raise.

    Args:
        seed: The candidate seed (any integer-like object but a bool).
        name: Argument name used in the error message.

    Returns:
        The seed as a Python ``int``.

    Raises:
        TypeError: If ``seed`` is not an integer.
        ValueError: If ``seed`` is negative or not below ``2**64``.
    """
    if isinstance(seed, bool):
        raise TypeError(f"{name} must be an int or None, got {seed!r}")
    try:
        value = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be an int or None, got {type(seed).__name__} {seed!r}"
        ) from None
    if not 0 <= value < _MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**64), got {value!r}; pass a non-negative int")
    return value


def fresh_seed() -> int:
    """Draw a new random seed from the operating system (not from any global RNG)."""
    return secrets.randbits(63)


def key_words(key: Iterable[int]) -> list[int]:
    """Encode integers injectively as 32-bit words, prefixed by their count."""
    values = [operator.index(k) for k in key]
    words = [len(values)]
    for value in values:
        if not 0 <= value < _MAX_SEED:
            raise ValueError(f"random key parts must be in [0, 2**64), got {value!r}")
        words.append(value & _MASK32)
        words.append(value >> 32)
    return words


def make_rng(*key: int) -> np.random.Generator:
    """Return a NumPy generator that depends only on ``key``.

    Example:
        >>> make_rng(0, STREAM_INPUTS, 7).random() == make_rng(0, STREAM_INPUTS, 7).random()
        True
    """
    return np.random.default_rng(key_words(key))


def derive_seed(*key: int) -> int:
    """Return a 63-bit integer seed that depends only on ``key``."""
    state = np.random.SeedSequence(key_words(key)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) | (int(state[1]) << 32)) & (2**63 - 1)


def index_key(index: object) -> tuple[int, ...] | None:
    """Turn a task index (int or tuple of ints) into key parts, or None if it has no key."""
    if isinstance(index, bool):
        return None
    if isinstance(index, tuple):
        parts: list[int] = []
        for item in index:
            try:
                parts.append(operator.index(item))
            except TypeError:
                return None
        if any(part < 0 for part in parts):
            return None
        return (len(parts), *parts)
    try:
        value = operator.index(index)  # type: ignore[arg-type]
    except TypeError:
        return None
    return (value,) if value >= 0 else None


_M64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def hash_key(*key: int) -> int:
    """Hash integer key parts (each in ``[0, 2**64)``) into one 64-bit stream key."""
    h = _mix(len(key) * _GOLDEN & _M64)
    for part in key:
        h = _mix((h + _GOLDEN + (operator.index(part) & _M64)) & _M64)
    return h


def _mix_array(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64 (no overflow warning for arrays)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
    return z ^ (z >> np.uint64(31))


def uniforms(keys: Sequence[int], count: int) -> np.ndarray:
    """Return ``count`` uniforms in ``[0, 1)`` per stream key, shape ``[len(keys), count]``.

    Example:
        >>> a = uniforms([hash_key(0, 1)], 3)
        >>> a.shape, bool((a == uniforms([hash_key(0, 1)], 3)).all())
        ((1, 3), True)
    """
    streams = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    counters = np.arange(1, count + 1, dtype=np.uint64).reshape(1, -1) * np.uint64(_GOLDEN)
    bits = _mix_array(streams + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def normals(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normals from two arrays of uniforms in ``[0, 1)`` (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def permutation(key: int, n: int) -> np.ndarray:
    """A random permutation of ``range(n)`` that depends only on ``key``."""
    return np.argsort(uniforms([key], n)[0], kind="stable")
