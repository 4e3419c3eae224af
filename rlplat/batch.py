"""Batch: the one data type that moves between the controller and the workers.

A ``Batch`` holds ``B`` rows in three parts:

- ``tensors``: a ``tensordict.TensorDict`` with ``batch_size=[B]``; flat string keys, any
  trailing shape (observations, actions, log-probabilities, rewards, ...).
- ``extras``: per-row data that is not a tensor, as numpy arrays with leading dim ``B``
  (instruction strings, prompts, episode ids as Python objects); strings are stored with
  ``dtype=object``.
- ``meta``: a plain dict about the batch as a whole (``{"step": 3}``); carried along by every
  operation, never sliced.

Row selection follows torch: a slice gives views of the original tensors and arrays, an index
tensor or mask gives copies. An integer index keeps the batch dim: ``b[3]`` is a ``Batch`` of
length 1, so every row selection returns the same type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

Index = int | slice | torch.Tensor | np.ndarray | Sequence[int] | Sequence[bool]

# numpy dtype kinds stored as tensors: bool, signed/unsigned int, float, complex.
_NUMERIC_KINDS = frozenset("biufc")


# Dtypes numpy cannot hold; such tensors are pickled as tensors.
_NO_NUMPY_DTYPES = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


def _as_extra(key: str, value: Any) -> np.ndarray:
    """Convert a non-tensor field to a numpy array with one entry per row."""
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.kind in "US":
            # Fixed-width strings truncate on assignment; objects do not.
            arr = arr.astype(object)
    elif isinstance(value, (list, tuple)):
        # One object per row, even when rows are themselves sequences.
        arr = np.empty(len(value), dtype=object)
        for i, item in enumerate(value):
            arr[i] = item
    else:
        raise TypeError(
            f"Batch field {key!r}: expected a torch.Tensor, a numpy array or a list, "
            f"got {type(value).__name__}; put values about the whole batch in meta"
        )
    if arr.ndim == 0:
        raise ValueError(
            f"Batch field {key!r} is a 0-dim array; every field needs a leading batch dim "
            "(put values about the whole batch in meta)"
        )
    return arr


def _as_tensor(key: str, value: Any) -> torch.Tensor:
    """Convert a tensor field (torch tensor or numeric numpy array) to a tensor."""
    if isinstance(value, np.ndarray):
        if not value.flags.writeable or any(s < 0 for s in value.strides):
            # torch.from_numpy refuses negative strides and warns on read-only arrays.
            value = value.copy()
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Batch tensor field {key!r}: expected a torch.Tensor, got {type(value).__name__}"
        )
    if value.ndim == 0:
        raise ValueError(
            f"Batch field {key!r} is a 0-dim tensor; every field needs a leading batch dim "
            "(put values about the whole batch in meta)"
        )
    return value


def _classify(key: str, value: Any) -> tuple[bool, torch.Tensor | np.ndarray]:
    """Return (is_tensor, converted value): numeric data becomes a tensor, the rest an extra."""
    if not isinstance(key, str):
        raise TypeError(f"Batch keys are strings, got {key!r}")
    if isinstance(value, torch.Tensor):
        return True, _as_tensor(key, value)
    if isinstance(value, np.ndarray) and value.dtype.kind in _NUMERIC_KINDS:
        return True, _as_tensor(key, value)
    return False, _as_extra(key, value)


def _normalize_index(idx: Any, n: int) -> slice | torch.Tensor:
    """Turn any row index into a slice or a 1-D int64 tensor of row positions."""
    if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
        i = int(idx)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range for a batch of {n} rows")
        i %= n
        return slice(i, i + 1)
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, np.ndarray):
        idx = torch.from_numpy(idx.copy())
    elif isinstance(idx, (list, tuple)):
        idx = torch.as_tensor(idx) if len(idx) else torch.empty(0, dtype=torch.long)
    if not isinstance(idx, torch.Tensor):
        raise TypeError(
            f"cannot index a Batch with {type(idx).__name__}; use a str key, an int, a slice, "
            "or a 1-D index/mask (torch tensor, numpy array or list)"
        )
    if idx.ndim != 1:
        raise IndexError(f"row index must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.cpu()
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise IndexError(f"boolean mask has {idx.numel()} entries for a batch of {n} rows")
        return idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise IndexError(f"row index must be integer or bool, got {idx.dtype}")
    idx = idx.long()
    if idx.numel() and (idx.max() >= n or idx.min() < -n):
        raise IndexError(f"row index out of range for a batch of {n} rows")
    return torch.where(idx < 0, idx + n, idx)


class Batch:
    """Rows of tensors and non-tensor extras, plus batch-level meta.

    Args:
        tensors: Tensor fields, each with leading dim ``B`` (a ``TensorDict`` or a mapping).
            Numeric numpy arrays are accepted and converted with ``torch.from_numpy``.
        extras: Non-tensor fields, each a numpy array or a list with ``B`` entries. String
            arrays are stored as ``dtype=object``; a list becomes a 1-D object array.
        meta: Values about the whole batch; shallow-copied.
        batch_size: ``B``; inferred from the first field when omitted, 0 when there is none.

    Raises:
        ValueError: a field's leading dim differs from the batch size, or a key is both a
            tensor and an extra.
    """

    __slots__ = ("_tensors", "_extras", "meta")

    def __init__(
        self,
        tensors: TensorDict | Mapping[str, torch.Tensor] | None = None,
        extras: Mapping[str, np.ndarray | Sequence[Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        # `tensors or {}` would fail: a TensorDict refuses conversion to bool.
        tensor_items = tensors.items() if tensors is not None else ()
        tensor_fields = {k: _as_tensor(k, v) for k, v in tensor_items}
        extra_fields = {k: _as_extra(k, v) for k, v in (extras or {}).items()}
        both = sorted(set(tensor_fields) & set(extra_fields))
        if both:
            raise ValueError(f"Batch keys {both} are given both as tensors and as extras")

        size_source = "the batch_size argument"
        if batch_size is None:
            first = next(iter({**tensor_fields, **extra_fields}.items()), None)
            batch_size = 0 if first is None else len(first[1])
            size_source = f"field {first[0]!r}" if first is not None else size_source
        for key, value in {**tensor_fields, **extra_fields}.items():
            if len(value) != batch_size:
                raise ValueError(
                    f"Batch field {key!r} has leading dim {len(value)}, expected {batch_size} "
                    f"(the batch size, set by {size_source})"
                )
        self._tensors = TensorDict(tensor_fields, batch_size=[batch_size])
        self._extras: dict[str, np.ndarray] = extra_fields
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def _from_parts(cls, tensors: TensorDict, extras: dict[str, np.ndarray], meta: dict) -> Batch:
        """Assemble a Batch from already validated parts (no checks, no copies)."""
        out = object.__new__(cls)
        out._tensors = tensors
        out._extras = extras
        out.meta = dict(meta)
        return out

    @classmethod
    def from_numpy_dict(
        cls, data: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> Batch:
        """Build a Batch from e.g. an env observation dict.

        Numeric (bool/int/float) arrays and tensors become tensors; string and object arrays,
        and lists, become extras.
        """
        tensors: dict[str, torch.Tensor] = {}
        extras: dict[str, np.ndarray] = {}
        for key, value in data.items():
            is_tensor, converted = _classify(key, value)
            (tensors if is_tensor else extras)[key] = converted
        return cls(tensors, extras, meta)

    # ------------------------------------------------------------------ container protocol

    @property
    def batch_size(self) -> int:
        """Number of rows ``B``."""
        return int(self._tensors.batch_size[0])

    @property
    def tensors(self) -> TensorDict:
        """The tensor fields (``batch_size=[B]``)."""
        return self._tensors

    @property
    def extras(self) -> dict[str, np.ndarray]:
        """The non-tensor per-row fields."""
        return self._extras

    def __len__(self) -> int:
        return self.batch_size

    def keys(self) -> list[str]:
        """Tensor keys, then extra keys."""
        return list(self._tensors.keys()) + list(self._extras)

    def __iter__(self) -> Iterator[str]:
        """Iterate over keys, like a mapping (use ``chunk``/``split`` for rows)."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._extras or key in self._tensors.keys())

    def __getitem__(self, idx: str | Index) -> Any:
        """``b["key"]`` gives a field; any row index gives a new Batch (``b[3]`` has length 1)."""
        if isinstance(idx, str):
            if idx in self._extras:
                return self._extras[idx]
            if idx in self._tensors.keys():
                return self._tensors[idx]
            raise KeyError(f"Batch has no key {idx!r}; keys: {self.keys()}")
        rows = _normalize_index(idx, self.batch_size)
        np_rows = rows if isinstance(rows, slice) else rows.numpy()
        return Batch._from_parts(
            self._tensors[rows], {k: v[np_rows] for k, v in self._extras.items()}, self.meta
        )

    def __setitem__(self, key: str, value: Any) -> None:
        """Set a field: tensors and numeric numpy arrays become tensors, the rest extras.

        A Batch with no fields takes its size from the first field set.
        """
        is_tensor, converted = _classify(key, value)
        if not self.keys() and len(converted) != self.batch_size:
            self._tensors = TensorDict({}, batch_size=[len(converted)])
        if len(converted) != self.batch_size:
            raise ValueError(
                f"Batch field {key!r} has leading dim {len(converted)}, expected {self.batch_size}"
            )
        if key in self:
            self.pop(key)
        if is_tensor:
            self._tensors[key] = converted
        else:
            self._extras[key] = converted

    def pop(self, key: str) -> torch.Tensor | np.ndarray:
        """Remove a field and return it."""
        if key in self._extras:
            return self._extras.pop(key)
        if key in self._tensors.keys():
            return self._tensors.pop(key)
        raise KeyError(f"Batch has no key {key!r}; keys: {self.keys()}")

    def select(self, *keys: str) -> Batch:
        """A new Batch with only these fields (same rows, same meta)."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"Batch has no keys {missing}; keys: {self.keys()}")
        tensor_keys = [k for k in keys if k in self._tensors.keys()]
        return Batch._from_parts(
            self._tensors.select(*tensor_keys),
            {k: self._extras[k] for k in keys if k in self._extras},
            self.meta,
        )

    def update(self, other: Batch | Mapping[str, Any]) -> Batch:
        """Set every field of ``other`` on this Batch (and merge its meta); returns self."""
        if isinstance(other, Batch):
            items = [*other._tensors.items(), *other._extras.items()]
            self.meta.update(other.meta)
        else:
            items = list(other.items())
        for key, value in items:
            self[key] = value
        return self

    # ------------------------------------------------------------------ rows

    def split(self, sizes: Sequence[int]) -> list[Batch]:
        """Contiguous pieces with the given numbers of rows (they must sum to ``B``)."""
        sizes = [int(s) for s in sizes]
        if any(s < 0 for s in sizes) or sum(sizes) != self.batch_size:
            raise ValueError(
                f"split sizes {sizes} must be >= 0 and sum to the batch size {self.batch_size}"
            )
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self[start : start + size])
            start += size
        return pieces

    def chunk(self, n: int) -> list[Batch]:
        """``n`` contiguous, nearly equal pieces; the first ``B % n`` get one extra row."""
        if n < 1 or n > self.batch_size:
            raise ValueError(
                f"cannot chunk a batch of {self.batch_size} rows into {n} pieces; "
                f"n must be between 1 and the batch size"
            )
        base, rem = divmod(self.batch_size, n)
        return self.split([base + 1 if i < rem else base for i in range(n)])

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """Stack batches along the rows; meta is merged, the first batch winning on conflicts.

        Raises:
            ValueError: no batches, or their tensor/extra keys differ.
        """
        if not batches:
            raise ValueError("Batch.concat needs at least one batch")
        first = batches[0]
        tensor_keys, extra_keys = list(first._tensors.keys()), list(first._extras)
        for i, b in enumerate(batches[1:], start=1):
            for kind, want, have in (
                ("tensor", set(tensor_keys), set(b._tensors.keys())),
                ("extra", set(extra_keys), set(b._extras)),
            ):
                if want != have:
                    raise ValueError(
                        f"Batch.concat: batch {i} lacks {kind} keys {sorted(want - have)} and "
                        f"has unexpected {kind} keys {sorted(have - want)} compared with batch 0"
                    )
        size = sum(len(b) for b in batches)
        tensors = TensorDict(
            {k: torch.cat([b._tensors[k] for b in batches]) for k in tensor_keys}, batch_size=[size]
        )
        extras = {k: np.concatenate([b._extras[k] for b in batches]) for k in extra_keys}
        meta: dict[str, Any] = {}
        for b in reversed(batches):
            meta.update(b.meta)
        return cls._from_parts(tensors, extras, meta)

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each row ``n`` times: ``[a, a, b, b]`` when interleaved (GRPO groups), else
        ``[a, b, a, b]``."""
        if n < 1:
            raise ValueError(f"repeat count must be >= 1, got {n}")
        rows = torch.arange(self.batch_size)
        return self[rows.repeat_interleave(n) if interleave else rows.repeat(n)]

    def minibatches(
        self, num_minibatches: int, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Yield ``num_minibatches`` equal minibatches of a random permutation of the rows.

        Raises:
            ValueError: the batch size is not divisible by ``num_minibatches``.
        """
        if num_minibatches < 1 or self.batch_size % num_minibatches:
            raise ValueError(
                f"a batch of {self.batch_size} rows does not split into {num_minibatches} equal "
                f"minibatches; choose a number of minibatches that divides {self.batch_size}"
            )
        size = self.batch_size // num_minibatches
        perm = torch.randperm(self.batch_size, generator=generator)
        for i in range(num_minibatches):
            yield self[perm[i * size : (i + 1) * size]]

    # ------------------------------------------------------------------ devices, pickling

    def to(self, device: torch.device | str) -> Batch:
        """A Batch whose tensors are on ``device`` (extras and meta are shared)."""
        return Batch._from_parts(self._tensors.to(device), dict(self._extras), self.meta)

    def __getstate__(self) -> dict[str, Any]:
        # CPU tensors travel as numpy arrays: pickling a numpy array is ~20x faster than a
        # torch tensor, which matters for the many small per-step batches sent through Ray.
        arrays, tensors = {}, {}
        for key, value in self._tensors.items():
            if value.device.type == "cpu" and value.dtype not in _NO_NUMPY_DTYPES:
                arrays[key] = value.detach().numpy()
            else:
                tensors[key] = value
        return {
            "arrays": arrays,
            "tensors": tensors,
            "order": list(self._tensors.keys()),
            "batch_size": self.batch_size,
            "extras": self._extras,
            "meta": self.meta,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Ray hands out large arrays as read-only views of its object store: copy those.
        arrays = {k: v if v.flags.writeable else v.copy() for k, v in state["arrays"].items()}
        fields = {**{k: torch.from_numpy(v) for k, v in arrays.items()}, **state["tensors"]}
        self._tensors = TensorDict({k: fields[k] for k in state["order"]}, batch_size=[state["batch_size"]])
        self._extras = state["extras"]
        self.meta = state["meta"]

    def __repr__(self) -> str:
        tensors = ", ".join(
            f"{k}: {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
            for k, v in self._tensors.items()
        )
        extras = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._extras.items())
        return (
            f"Batch(size={self.batch_size}, tensors={{{tensors}}}, extras={{{extras}}}, "
            f"meta={list(self.meta)})"
        )
