"""The embedded catalog's DuckDB tables under concurrent requests (issue #12)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow
import pytest

from nvmri_bluesky.catalog._embedded import EmbeddedServer

pytestmark = pytest.mark.timeout(300)

WRITERS, READERS, APPENDS, ROWS = 3, 3, 40, 5


def test_concurrent_appends_and_reads_keep_every_row(tmp_path, monkeypatch) -> None:
    """Writers append to same-schema tables while readers read them: no error, no row lost
    or duplicated.  With tiled's shared DuckDB connection (``StaticPool``) this failed with
    ``closed pending query result`` (HTTP 500) and, after the client's retry, duplicated rows."""
    from tiled.client import from_uri

    errors: list[str] = []  # every failure in any thread
    done = threading.Event()
    with EmbeddedServer(tmp_path / "catalog") as server:
        root = from_uri(server.uri, api_key=server.api_key).create_container("stress")
        schema = pyarrow.schema([("seq_num", pyarrow.int64()), ("value", pyarrow.float64())])
        tables = [root.create_appendable_table(schema, key=f"t{i}") for i in range(WRITERS)]

        def write(i: int) -> None:
            client = tables[i]
            for k in range(APPENDS):
                seq = np.arange(k * ROWS, (k + 1) * ROWS)
                batch = pyarrow.table({"seq_num": seq, "value": seq * 0.5 + i})
                try:
                    client.append_partition(0, batch)
                except Exception as err:  # noqa: BLE001 - every failure is the finding
                    errors.append(f"append t{i}: {err!r}"[:300])

        def read() -> None:
            while not done.is_set():
                for i in range(WRITERS):
                    try:
                        tables[i].read()
                    except Exception as err:  # noqa: BLE001
                        errors.append(f"read t{i}: {err!r}"[:300])

        readers = [threading.Thread(target=read) for _ in range(READERS)]
        writers = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in readers:
            t.join()
        assert errors == [], errors[:5]
        for i, table in enumerate(tables):
            df = table.read()
            assert list(df["seq_num"]) == list(range(APPENDS * ROWS)), i
            assert np.allclose(df["value"], df["seq_num"] * 0.5 + i)
