"""The pairwise-preference data format shared by offline sources, pair makers and filters:
Pick-a-Pic v2's parquet schema (``yuvalkirstain/pickapic_v2`` as published), so data made or
filtered here loads wherever Pick-a-Pic does, and the other way round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The columns of Pick-a-Pic v2, in file order (the no-images variant lacks jpg_0 / jpg_1).
PICKAPIC_V2_COLUMNS = (
    "are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid", "image_0_url",
    "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1", "ranking_id",
    "user_id", "num_example_per_prompt", "__index_level_0__",
)


def pickapic_v2_schema() -> Any:
    """The pyarrow schema of Pick-a-Pic v2's parquet files."""
    import pyarrow as pa

    string, int64, f64 = pa.string(), pa.int64(), pa.float64()
    return pa.schema([
        ("are_different", pa.bool_()), ("best_image_uid", string), ("caption", string),
        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", string),
        ("image_0_url", string), ("image_1_uid", string), ("image_1_url", string), ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()), ("label_0", f64), ("label_1", f64), ("model_0", string), ("model_1", string),
        ("ranking_id", int64), ("user_id", int64), ("num_example_per_prompt", int64), ("__index_level_0__", int64),
    ])


def write_pairs(rows: Sequence[dict[str, Any]], path: str | Path, row_group_size: int = 256) -> Path:
    """Writes rows (dicts with the v2 columns) as one parquet shard in the v2 schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows), schema=pickapic_v2_schema()), path, row_group_size=row_group_size)
    return path
