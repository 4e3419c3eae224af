"""Batch: construction, row selection, chunk/concat, repeat, minibatches, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlplat.batch import Batch


def make_batch(n: int = 5) -> Batch:
    """Rows i = 0..n-1 with obs [i, 10i], act i, and instruction "task i"."""
    i = torch.arange(n)
    return Batch(
        tensors={"obs": torch.stack([i, 10 * i], dim=1).float(), "act": i},
        extras={"instruction": [f"task {k}" for k in range(n)]},
        meta={"step": 3},
    )


def assert_batch_equal(a: Batch, b: Batch) -> None:
    assert a.keys() == b.keys()
    assert len(a) == len(b)
    for key in a.tensors.keys():
        assert a[key].dtype == b[key].dtype
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for key in a.extras:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == b[key].dtype
    assert a.meta == b.meta


def rows(b: Batch) -> list[int]:
    return b["act"].tolist()


# ------------------------------------------------------------------ construction


def test_construction_infers_size_and_stores_strings_as_objects() -> None:
    b = make_batch(4)
    assert len(b) == b.batch_size == 4
    assert b.keys() == ["obs", "act", "instruction"]
    assert "obs" in b and "instruction" in b and "nope" not in b
    assert b["instruction"].dtype == object
    assert b["instruction"][2] == "task 2"
    assert b.meta == {"step": 3}
    assert isinstance(b.tensors, TensorDict) and b.tensors.batch_size == torch.Size([4])


def test_construction_from_a_tensordict() -> None:
    td = TensorDict({"obs": torch.zeros(3, 2), "act": torch.arange(3)}, batch_size=[3])
    b = Batch(td, extras={"instruction": ["a", "b", "c"]})
    assert len(b) == 3 and b.keys() == ["obs", "act", "instruction"]
    assert b["act"].tolist() == [0, 1, 2]


def test_mismatched_leading_dim_names_field_and_sizes() -> None:
    with pytest.raises(ValueError, match=r"'b' has leading dim 3, expected 4.*field 'a'"):
        Batch({"a": torch.zeros(4), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'instruction' has leading dim 2, expected 4"):
        Batch({"a": torch.zeros(4, 2)}, extras={"instruction": ["x", "y"]})
    with pytest.raises(ValueError, match=r"'a' has leading dim 4, expected 5 .*batch_size arg"):
        Batch({"a": torch.zeros(4)}, batch_size=5)


def test_construction_rejects_scalars_and_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="0-dim"):
        Batch({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"\['a'\].*both"):
        Batch({"a": torch.zeros(2)}, extras={"a": ["x", "y"]})
    with pytest.raises(TypeError, match="'a'"):
        Batch(extras={"a": 3})


def test_empty_batch_takes_size_from_first_field() -> None:
    b = Batch()
    assert len(b) == 0 and b.keys() == []
    b["x"] = torch.ones(3)
    assert len(b) == 3
    with pytest.raises(ValueError, match="'y' has leading dim 2, expected 3"):
        b["y"] = torch.ones(2)


def test_setitem_routes_values_by_type() -> None:
    b = make_batch(3)
    b["reward"] = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    b["done"] = np.array([True, False, True])
    b["prompt"] = np.array(["a", "bb", "ccc"])
    b["info"] = [{"k": 1}, None, (1, 2)]
    assert isinstance(b["reward"], torch.Tensor) and b["reward"].dtype == torch.float32
    assert b["done"].dtype == torch.bool
    assert b["prompt"].dtype == object and b["prompt"].tolist() == ["a", "bb", "ccc"]
    assert b["info"].shape == (3,) and b["info"][2] == (1, 2)
    # Re-setting a key with another kind moves it.
    b["act"] = ["x", "y", "z"]
    assert "act" in b.extras and "act" not in b.tensors.keys()


def test_from_numpy_dict_splits_numeric_from_text() -> None:
    obs = {
        "image": np.zeros((2, 4, 4, 3), dtype=np.uint8),
        "state": np.arange(6, dtype=np.float64).reshape(2, 3)[::-1],  # negative stride
        "instruction": np.array(["pick", "place"]),
    }
    b = Batch.from_numpy_dict(obs, meta={"step": 1})
    assert set(b.tensors.keys()) == {"image", "state"}
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (2, 4, 4, 3)
    assert b["state"].tolist() == [[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]
    assert b["instruction"].tolist() == ["pick", "place"] and b["instruction"].dtype == object
    assert b.meta == {"step": 1}


# ------------------------------------------------------------------ rows


def test_indexing_by_key_int_slice_tensor_mask_and_numpy() -> None:
    b = make_batch(5)
    assert b["act"].tolist() == [0, 1, 2, 3, 4]
    one = b[2]
    assert isinstance(one, Batch) and len(one) == 1 and rows(one) == [2]
    assert one["instruction"].tolist() == ["task 2"] and one.meta == {"step": 3}
    assert rows(b[-1]) == [4]
    assert rows(b[1:4]) == [1, 2, 3]
    assert rows(b[torch.tensor([4, 0, 0])]) == [4, 0, 0]
    assert b[torch.tensor([4, 0])]["instruction"].tolist() == ["task 4", "task 0"]
    assert rows(b[torch.tensor([True, False, True, False, False])]) == [0, 2]
    assert rows(b[np.array([3, 1])]) == [3, 1]
    assert rows(b[np.array([False, True, False, False, True])]) == [1, 4]
    assert rows(b[[0, -1]]) == [0, 4]
    with pytest.raises(IndexError, match="row 5 is out of range for a batch of 5"):
        b[5]
    with pytest.raises(IndexError, match="mask has 2 entries for a batch of 5"):
        b[torch.tensor([True, False])]
    with pytest.raises(KeyError, match="no key 'nope'"):
        b["nope"]


def test_row_selection_copies_meta_dict() -> None:
    b = make_batch(3)
    sub = b[0:2]
    sub.meta["step"] = 99
    assert b.meta == {"step": 3}


def test_chunk_concat_round_trip_keeps_everything() -> None:
    b = make_batch(6)
    pieces = b.chunk(3)
    assert [rows(p) for p in pieces] == [[0, 1], [2, 3], [4, 5]]
    assert_batch_equal(Batch.concat(pieces), b)


def test_uneven_chunks_like_array_split() -> None:
    b = make_batch(7)
    pieces = b.chunk(3)
    assert [rows(p) for p in pieces] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p["instruction"].tolist() for p in pieces][1] == ["task 3", "task 4"]
    assert_batch_equal(Batch.concat(pieces), b)
    with pytest.raises(ValueError, match="3 rows into 4 pieces"):
        make_batch(3).chunk(4)


def test_split_by_sizes() -> None:
    b = make_batch(5)
    assert [rows(p) for p in b.split([1, 0, 4])] == [[0], [], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match=r"\[2, 2\].*5"):
        b.split([2, 2])


def test_concat_merges_meta_first_wins_and_checks_keys() -> None:
    a, b = make_batch(2), make_batch(3)
    a.meta = {"step": 1}
    b.meta = {"step": 2, "seed": 7}
    out = Batch.concat([a, b])
    assert rows(out) == [0, 1, 0, 1, 2]
    assert out.meta == {"step": 1, "seed": 7}
    with pytest.raises(ValueError, match=r"batch 1 lacks tensor keys \['obs'\]"):
        Batch.concat([a, b.select("act", "instruction")])
    c = make_batch(2)
    c["x"] = ["p", "q"]
    with pytest.raises(ValueError, match=r"lacks extra keys \[\] and has unexpected extra keys"):
        Batch.concat([a, c])
    with pytest.raises(ValueError, match="at least one"):
        Batch.concat([])


def test_select_pop_update() -> None:
    b = make_batch(3)
    s = b.select("act", "instruction")
    assert s.keys() == ["act", "instruction"] and s.meta == b.meta
    with pytest.raises(KeyError, match=r"\['zzz'\]"):
        b.select("zzz")
    popped = b.pop("obs")
    assert popped.shape == (3, 2) and "obs" not in b
    other = Batch({"adv": torch.ones(3)}, extras={"tag": ["a", "b", "c"]}, meta={"epoch": 2})
    assert b.update(other) is b
    assert b.keys() == ["act", "adv", "instruction", "tag"]  # tensors first, then extras
    assert b.meta == {"step": 3, "epoch": 2}
    b.update({"ret": torch.zeros(3)})
    assert b["ret"].tolist() == [0.0, 0.0, 0.0]


def test_repeat_interleave_vs_tile() -> None:
    b = make_batch(3)
    inter = b.repeat(2, interleave=True)
    assert rows(inter) == [0, 0, 1, 1, 2, 2]
    assert inter["instruction"].tolist() == [f"task {r}" for r in (0, 0, 1, 1, 2, 2)]
    tiled = b.repeat(2, interleave=False)
    assert rows(tiled) == [0, 1, 2, 0, 1, 2]
    assert tiled["obs"][:, 1].tolist() == [0.0, 10.0, 20.0, 0.0, 10.0, 20.0]
    with pytest.raises(ValueError, match=">= 1"):
        b.repeat(0)


def test_minibatches_cover_a_permutation_and_check_divisibility() -> None:
    b = make_batch(12)
    mbs = list(b.minibatches(3, generator=torch.Generator().manual_seed(0)))
    assert [len(m) for m in mbs] == [4, 4, 4]
    seen = sorted(r for m in mbs for r in rows(m))
    assert seen == list(range(12))
    # Extras follow their rows.
    for m in mbs:
        assert m["instruction"].tolist() == [f"task {r}" for r in rows(m)]
    again = list(b.minibatches(3, generator=torch.Generator().manual_seed(0)))
    assert [rows(m) for m in again] == [rows(m) for m in mbs]
    with pytest.raises(ValueError, match="batch of 10 rows does not split into 3 equal minibat"):
        next(make_batch(10).minibatches(3))


# ------------------------------------------------------------------ devices, pickling, repr


def test_pickle_round_trip() -> None:
    b = make_batch(4)
    b["info"] = [{"k": 1}, None, "s", 2.5]
    b.meta["nested"] = {"a": [1, 2]}
    assert_batch_equal(pickle.loads(pickle.dumps(b)), b)
    # A slice (a view) pickles as its own rows only.
    assert_batch_equal(pickle.loads(pickle.dumps(b[1:3])), b[1:3])


def test_to_moves_tensors_and_keeps_extras() -> None:
    b = make_batch(2)
    moved = b.to("cpu")
    assert moved["obs"].device.type == "cpu"
    assert_batch_equal(moved, b)
    moved = b.to(torch.device("meta"))
    assert moved["obs"].device.type == "meta"
    assert moved["instruction"].tolist() == ["task 0", "task 1"]


def test_repr_is_short() -> None:
    text = repr(make_batch(4))
    assert text == (
        "Batch(size=4, tensors={obs: float32[4, 2], act: int64[4]}, "
        "extras={instruction: object[4]}, meta=['step'])"
    )
