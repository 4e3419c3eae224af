"""OpenVLA-exact action tokens and dataset_statistics.json (un)normalisation.

Expected ids are worked out by hand from OpenVLA's contract: edges linspace(-1, 1, n_bins),
id = vocab_size - np.digitize(clip(a), edges), decode index clip(vocab_size - id - 1, 0, n_bins - 2).
"""

import json

import numpy as np
import pytest

from rlplat.policies.openvla import (
    ActionTokenizer,
    compute_stats,
    load_stats,
    normalize,
    resolve_unnorm_key,
    save_stats,
    unnormalize,
)

VOCAB, BINS = 32000, 256
WIDTH = 2 / 255  # bin width of the 256-edge OpenVLA grid


@pytest.fixture
def tok() -> ActionTokenizer:
    return ActionTokenizer(vocab_size=VOCAB, n_bins=BINS)


# ---- tokenizer ------------------------------------------------------------------------------


def test_bounds_encode_to_the_ends_of_the_vocabulary(tok):
    # -1 -> digitize 1 -> 32000 - 1; +1 -> digitize 256 (x >= last edge) -> 32000 - 256.
    np.testing.assert_array_equal(tok.encode(np.array([-1.0, 1.0])), [31999, 31744])


def test_out_of_range_clips_to_the_bound_ids(tok):
    ids = tok.encode(np.array([-5.0, 5.0, -1e9, np.inf]))
    np.testing.assert_array_equal(ids, [31999, 31744, 31999, 31744])


def test_internal_edge_belongs_to_the_bin_above(tok):
    edge = -1 + 100 * WIDTH  # bins[100]
    assert tok.bins[100] == pytest.approx(edge, abs=1e-15)
    # np.digitize(right=False): bins[100] <= x < bins[101] -> 101; just below the edge -> 100.
    ids = tok.encode(np.array([tok.bins[100], np.nextafter(tok.bins[100], -2.0)]))
    np.testing.assert_array_equal(ids, [VOCAB - 101, VOCAB - 100])


def test_small_grid_by_hand():
    # 5 edges [-1, -0.5, 0, 0.5, 1] (exact floats), 4 centres [-0.75, -0.25, 0.25, 0.75].
    t = ActionTokenizer(vocab_size=10, n_bins=5)
    a = np.array([-1.0, -0.5, -0.1, 0.0, 0.25, 0.4999, 0.5, 1.0])
    np.testing.assert_array_equal(t.encode(a), [9, 8, 8, 7, 7, 7, 6, 5])
    # id 5 (digitize 5 = max_action) and id 6 share the last centre; out-of-range ids clip.
    ids = np.array([9, 8, 7, 6, 5, 10, 11, 0, -3])
    np.testing.assert_array_equal(t.decode(ids), [-0.75, -0.25, 0.25, 0.75, 0.75, -0.75, -0.75, 0.75, 0.75])
    assert t.action_token_range == (5, 9)
    assert t.action_token_begin_idx == 4


def test_encode_matches_closed_form_and_keeps_shape(tok):
    rng = np.random.default_rng(0)
    a = rng.uniform(-1.2, 1.2, size=(4, 3, 7))
    ids = tok.encode(a)
    assert ids.shape == a.shape and ids.dtype == np.int64
    c = np.clip(a, -1, 1)
    expected = VOCAB - np.minimum(np.floor((c + 1) / WIDTH) + 1, BINS)
    np.testing.assert_array_equal(ids, expected)


def test_round_trip_within_half_a_bin(tok):
    a = np.random.default_rng(1).uniform(-1, 1, size=(1000, 7))
    a[0, :2] = [-1.0, 1.0]
    err = np.abs(tok.decode(tok.encode(a)) - a)
    assert err.max() <= WIDTH / 2 + 1e-12


def test_decode_clips_ids_outside_the_action_range(tok):
    first, last = tok.bin_centers[0], tok.bin_centers[-1]
    assert first == pytest.approx(-1 + WIDTH / 2) and last == pytest.approx(1 - WIDTH / 2)
    ids = np.array([VOCAB, VOCAB + 63, 31999, 31745, 31744, 31743, 0])
    np.testing.assert_array_equal(tok.decode(ids), [first, first, first, last, last, last, last])


def test_token_range_and_begin_idx(tok):
    assert tok.action_token_range == (31744, 31999)
    assert tok.action_token_begin_idx == VOCAB - (BINS + 1) == 31743
    ids = tok.encode(np.linspace(-3, 3, 10001))
    lo, hi = tok.action_token_range
    assert ids.min() == lo and ids.max() == hi and len(np.unique(ids)) == BINS
    assert (ids > tok.action_token_begin_idx).all()  # OpenVLA's action-position test
    assert tok.n_bins == BINS and tok.vocab_size == VOCAB
    assert len(tok.bins) == BINS and len(tok.bin_centers) == BINS - 1


def test_torch_paths_equal_numpy(tok):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.uniform(-1.5, 1.5, 500), tok.bins, [-1.0, 1.0]]).astype(np.float32)
    np.testing.assert_array_equal(tok.encode_torch(torch.from_numpy(a)).numpy(), tok.encode(a))
    ids = np.arange(VOCAB - 300, VOCAB + 10)
    np.testing.assert_array_equal(tok.decode_torch(torch.from_numpy(ids)).numpy(), tok.decode(ids))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_bins": 1}, "n_bins"),
        ({"min_action": 1.0, "max_action": 1.0}, "min_action"),
        ({"min_action": 0.0, "max_action": float("nan")}, "max_action"),
        ({"vocab_size": 256}, "vocab_size"),
    ],
)
def test_invalid_args_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ActionTokenizer(**kwargs)


# ---- normalisation --------------------------------------------------------------------------


def _write_openvla_stats(tmp_path, extra_key: bool = False):
    entry = {
        "action": {
            "mean": [1.0, 0.0, 0.5],
            "std": [0.5, 1.0, 0.5],
            "max": [2.5, 3.0, 1.0],
            "min": [-0.5, -3.0, 0.0],
            "q01": [0.0, -2.0, 0.0],
            "q99": [2.0, 2.0, 1.0],
            "mask": [True, True, False],
        },
        "proprio": {k: [0.0] * 3 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 100,
        "num_trajectories": 4,
    }
    stats = {"toy_dataset": entry}
    if extra_key:
        stats["other_dataset"] = json.loads(json.dumps(entry))
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps(stats, indent=2))
    return path


def test_unnormalize_with_mask_by_hand(tmp_path):
    stats = load_stats(_write_openvla_stats(tmp_path))
    # dim0: 0.5 * 1 * 2 + 0 = 1; dim1: 0.5 * 1.5 * 4 - 2 = 1; dim2 unmasked passes through.
    np.testing.assert_allclose(unnormalize(np.array([0.0, 0.5, 0.3]), stats), [1.0, 1.0, 0.3])
    batch = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(unnormalize(batch, stats, "toy_dataset"), [[0, -2, -1], [2, 2, 1]])


def test_mask_defaults_to_all_true(tmp_path):
    stats = load_stats(_write_openvla_stats(tmp_path))
    del stats["toy_dataset"]["action"]["mask"]
    np.testing.assert_allclose(unnormalize(np.array([0.0, 0.5, 0.3]), stats), [1.0, 1.0, 0.65])


def test_load_stats_accepts_dict_file_and_folder(tmp_path):
    path = _write_openvla_stats(tmp_path)
    from_file, from_dir = load_stats(path), load_stats(tmp_path)
    assert from_file == from_dir == load_stats(json.loads(path.read_text()))
    with pytest.raises(FileNotFoundError, match="dataset_statistics.json"):
        load_stats(tmp_path / "missing")
    with pytest.raises(ValueError, match="wrap"):
        load_stats(from_file["toy_dataset"])


def test_key_selection_errors(tmp_path):
    stats = load_stats(_write_openvla_stats(tmp_path, extra_key=True))
    with pytest.raises(ValueError, match="toy_dataset.*other_dataset"):
        unnormalize(np.zeros(3), stats)
    with pytest.raises(ValueError, match="'nope'.*toy_dataset"):
        unnormalize(np.zeros(3), stats, key="nope")
    assert resolve_unnorm_key(stats, "other_dataset") == "other_dataset"
    assert resolve_unnorm_key({"only": stats["toy_dataset"]}) == "only"


def test_dimension_mismatch_names_both_sizes(tmp_path):
    stats = load_stats(_write_openvla_stats(tmp_path))
    with pytest.raises(ValueError, match=r"2 action dims.*has 3"):
        unnormalize(np.zeros((5, 2)), stats)
    with pytest.raises(ValueError, match=r"7 action dims.*has 3"):
        normalize(np.zeros(7), stats)


def test_normalize_saturates_and_zeroes_unused_dims():
    entry = {"q01": [0.0, -1.0], "q99": [2.0, 1.0], "min": [-1.0, 0.5], "max": [3.0, 0.5]}
    stats = {"d": {"action": entry}}
    # dim0: 2 * (x - 0) / 2 - 1 = x - 1, clipped; dim1: min == max -> 0 (OpenVLA).
    out = normalize(np.array([[1.0, 0.5], [10.0, 0.5], [-10.0, 0.5]]), stats)
    np.testing.assert_allclose(out, [[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], atol=1e-7)


def test_compute_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4)) * [1.0, 0.1, 5.0, 2.0] + [0.0, 1.0, -3.0, 0.5]
    entry = compute_stats(x, num_trajectories=10, mask=[True, True, True, False])
    written = save_stats({"my_dataset": entry}, tmp_path)
    assert written == tmp_path / "dataset_statistics.json"
    assert written.read_text().startswith('{\n  "my_dataset": {\n    "action"')  # indent 2

    stats = load_stats(written)
    action = stats["my_dataset"]["action"]
    assert set(action) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert all(type(v) is float for k in ("mean", "std", "q01", "q99") for v in action[k])
    assert action["mask"] == [True, True, True, False]
    np.testing.assert_allclose(action["q01"], np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(action["q99"], np.quantile(x, 0.99, axis=0))
    np.testing.assert_allclose(action["std"], x.std(0))
    assert stats["my_dataset"]["num_transitions"] == 500
    assert stats["my_dataset"]["num_trajectories"] == 10
    assert stats["my_dataset"]["proprio"]["max"] == [0.0] * 4  # no proprio -> zeros, as OpenVLA

    inside = x[((x >= action["q01"]) & (x <= action["q99"])).all(1)]
    assert len(inside) > 400
    z = normalize(inside, stats)
    assert np.abs(z[:, :3]).max() <= 1.0
    np.testing.assert_array_equal(z[:, 3], inside[:, 3])  # unmasked dim untouched
    np.testing.assert_allclose(unnormalize(z, stats), inside, atol=1e-6)


def test_compute_stats_validates_inputs():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="mask has 2 entries.*3 dims"):
        compute_stats(x, mask=[True, False])
    with pytest.raises(ValueError, match="proprio has 4 rows.*10"):
        compute_stats(x, proprio=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="actions must be a non-empty"):
        compute_stats(np.zeros(3))
    with pytest.raises(ValueError, match="num_trajectories"):
        compute_stats(x, num_trajectories=11)
    assert compute_stats(x)["action"]["mask"] == [True, True, True]
