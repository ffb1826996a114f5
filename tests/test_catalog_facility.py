"""The facility tiled server (profile_collection/tiled/config.yml) on the machine's PostgreSQL.

Each module run creates three fresh databases ``nvmri_test_<random>_{catalog,storage,authn}``
(the server's own preparation step creates them), starts ``serve_catalog`` in a
subprocess on a free loopback port, mints a write key and a read-only key, and
drops the databases afterwards. PostgreSQL is expected at 127.0.0.1:5432 with
trust auth (override with ``$NVMRI_TEST_PG``); these tests do not skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import scan
from ophyd.sim import SynSignal, det, motor

from nvmri_bluesky.catalog import (
    DEFAULT_CONFIG,
    READ_SCOPES,
    WRITE_SCOPES,
    create_api_key,
    import_spool,
    open_catalog,
    read_spool,
    run_table,
)
from nvmri_bluesky.cli import cli_runs
from nvmri_bluesky.errors import NvmriError

pytestmark = [pytest.mark.facility, pytest.mark.timeout(900)]  # a loaded machine

PG = os.environ.get("NVMRI_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
STARTUP_TIMEOUT = 300.0  # s; a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _drop_databases(prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{PG}/postgres", timeout=10)
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{prefix}\\_%"
        )
        for row in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def facility(tmp_path_factory):
    root = tmp_path_factory.mktemp("facility")
    prefix = f"nvmri_test_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    env = dict(os.environ)
    env.update(
        NVMRI_TILED_PG=PG,
        NVMRI_TILED_DB=prefix,
        NVMRI_TILED_DATA_DIR=str(root / "data"),
        NVMRI_TILED_SECRET_KEY=secrets.token_hex(32),
        NVMRI_TILED_ADMIN_PASSWORD=password,
        TILED_CACHE_DIR=str(root / "client-cache"),
    )
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    code = (
        "import sys; from nvmri_bluesky.catalog import serve_catalog; "
        "serve_catalog(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))"
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(DEFAULT_CONFIG), str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"facility server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{uri}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"facility server not up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        old_cache = os.environ.get("TILED_CACHE_DIR")
        os.environ["TILED_CACHE_DIR"] = env["TILED_CACHE_DIR"]
        write_key = create_api_key(uri, WRITE_SCOPES, admin_password=password, note="test write")
        read_key = create_api_key(uri, READ_SCOPES, admin_password=password, note="test read")
        yield SimpleNamespace(
            uri=uri, write_key=write_key, read_key=read_key, root=root, password=password
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if "old_cache" in locals():
            if old_cache is None:
                os.environ.pop("TILED_CACHE_DIR", None)
            else:
                os.environ["TILED_CACHE_DIR"] = old_cache
        asyncio.run(_drop_databases(prefix))


def _counts() -> SynSignal:
    rng = np.random.default_rng(5)
    return SynSignal(func=lambda: rng.poisson(50.0, 12).astype(float), name="counter_counts")


_CONTAINER = {  # the body tiled's client posts to create a node
    "id": "intruder",
    "ancestors": [],
    "structure_family": "container",
    "metadata": {},
    "specs": [],
    "data_sources": [],
    "access_tags": None,
}


def test_anonymous_access_is_refused(facility):
    response = httpx.get(f"{facility.uri}/api/v1/search/", timeout=10)
    assert response.status_code == 401
    with pytest.raises(NvmriError, match="refuses anonymous access") as info:
        open_catalog(facility.uri)
    assert "\n" not in str(info.value)


def test_write_without_key_is_refused(facility):
    response = httpx.post(f"{facility.uri}/api/v1/metadata/", json=_CONTAINER, timeout=10)
    assert response.status_code == 401


def test_bad_key_is_refused(facility):
    with pytest.raises(NvmriError, match="refused the API key"):
        open_catalog(facility.uri, api_key="0" * 72)


@pytest.mark.filterwarnings("ignore:The callback .* when RunRouter passed it")
def test_read_only_key_cannot_write(facility, tmp_path):
    response = httpx.post(
        f"{facility.uri}/api/v1/metadata/",
        json=_CONTAINER,
        headers={"Authorization": f"Apikey {facility.read_key}"},
        timeout=10,
    )
    assert response.status_code == 401
    assert "create:node" in response.text

    RE = RunEngine({})
    with open_catalog(facility.uri, facility.read_key) as cat:
        cat.runs()  # reading is allowed
        cat.subscribe(RE, tmp_path / "spool")
        (uid,) = RE(scan([det, _counts()], motor, 0, 1, 5))
        errors = cat.writer_errors
    assert RE.state == "idle"
    assert errors and "401" in errors[0]
    spooled = list(read_spool(next((tmp_path / "spool").iterdir())))
    assert sum(name == "event" for name, _ in spooled) == 5

    # The write key imports the spooled run, once.
    results = import_spool(tmp_path / "spool", facility.uri, api_key=facility.write_key)
    assert [(r.uid, r.action, r.events) for r in results] == [(uid, "imported", 5)]
    results = import_spool(tmp_path / "spool", facility.uri, api_key=facility.write_key)
    assert [r.action for r in results] == ["present"]


def test_write_key_writes_and_read_key_reads(facility, tmp_path):
    RE = RunEngine({})
    with open_catalog(facility.uri, facility.write_key) as cat:
        cat.subscribe(RE, tmp_path / "spool", batch_size=4)
        (uid,) = RE(scan([det, _counts()], motor, 0, 1, 9), scenario="single-spin")
        assert cat.writer_errors == []
    with open_catalog(facility.uri, facility.read_key) as cat:
        ds = run_table(cat.run(uid[:8]))
        assert ds.sizes["time"] == 9 and ds.sizes["gate"] == 12
        spooled = [d for n, d in read_spool(next((tmp_path / "spool").iterdir())) if n == "event"]
        np.testing.assert_array_equal(
            ds["counter_counts"].values, [e["data"]["counter_counts"] for e in spooled]
        )
        docs = list(cat.documents(uid))
        assert sum(n == "event" for n, _ in docs) == 9 and docs[-1][0] == "stop"
    table = cli_runs(facility.uri, api_key=facility.read_key)
    assert any(line.startswith(uid[:8]) and "single-spin" in line for line in table.splitlines())


def _write_scan(uri: str, key: str, spool: Any, points: int = 5) -> str:
    RE = RunEngine({})
    with open_catalog(uri, key) as cat:
        cat.subscribe(RE, spool)
        (uid,) = RE(scan([det, _counts()], motor, 0, 1, points))
        assert cat.writer_errors == []
    return uid


def test_instrument_keys_cannot_change_each_others_runs(facility, tmp_path):
    from tiled.client.container import Container

    key_a = create_api_key(facility.uri, WRITE_SCOPES, admin_password=facility.password,
                           instrument="A", note="instrument A")
    key_b = create_api_key(facility.uri, WRITE_SCOPES, admin_password=facility.password,
                           instrument="B", note="instrument B")
    uid_a = _write_scan(facility.uri, key_a, tmp_path / "spool-a")
    uid_b = _write_scan(facility.uri, key_b, tmp_path / "spool-b")  # B writes its own runs

    with open_catalog(facility.uri, key_b) as cat:
        run_a = cat.run(uid_a)
        assert run_a.metadata["stop"]["exit_status"] == "success"  # B may read A's run
        with pytest.raises(Exception) as info:  # noqa: PT011 - tiled's client error
            run_a.update_metadata({"stop": {**run_a.metadata["stop"], "exit_status": "abort",
                                            "reason": "tampered by instrument B"}})
        assert "403" in str(info.value) or "Not enough permissions" in str(info.value)
        with pytest.raises(Exception) as info:  # noqa: PT011
            cat.client.delete_contents(uid_a, recursive=True, external_only=False)
        assert "403" in str(info.value) or "401" in str(info.value), str(info.value)
        with pytest.raises(Exception):  # noqa: B017, PT011 - cannot write into A's run
            Container.__getitem__(run_a, "primary").base.create_container(key="intruder")
        run_b = cat.run(uid_b)
        run_b.update_metadata({"nvmri_note": "B edits its own run"})  # allowed
    with open_catalog(facility.uri, facility.read_key) as cat:
        stop = cat.run(uid_a).metadata["stop"]
        assert stop["exit_status"] == "success" and "reason" not in stop or not stop["reason"]
        assert cat.run(uid_b).metadata["nvmri_note"] == "B edits its own run"
        assert "intruder" not in list(cat.run(uid_a)["primary"].base)
    with open_catalog(facility.uri, key_a) as cat:  # A still owns its run
        cat.run(uid_a).update_metadata({"nvmri_note": "A edits its own run"})
