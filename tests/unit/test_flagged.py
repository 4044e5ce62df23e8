"""Reading a flagged batch: its size is bounded before it is loaded."""

import pandas as pd
import pytest

from audit.errors import InvalidFlaggedBatch
from audit.flagged import read_batch


def test_a_batch_over_the_row_bound_is_refused_before_it_is_loaded(tmp_path):
    parquet = tmp_path / "a.parquet"
    pd.DataFrame({"example_id": ["a", "b", "c"]}).to_parquet(parquet)
    csv = tmp_path / "b.csv"
    csv.write_text("example_id\nd\ne\n")
    assert len(read_batch([parquet, csv], max_rows=5)) == 5
    with pytest.raises(InvalidFlaggedBatch, match="has 5 rows, more than the 4 an audit takes"):
        read_batch([parquet, csv], max_rows=4)
    broken = tmp_path / "c.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(InvalidFlaggedBatch, match="Cannot read flagged batch c.parquet"):
        read_batch([broken], max_rows=4)
