"""Channel Access access security of the simulated IOC (nvmri_bluesky/sim/access.py).

The IOC is a real subprocess with a write list (user ``alice`` on host
``console1``); clients are real CA clients (caproto's threading client, which
declares a user and host name in its handshake like libca does) in their own
process. Reads work for everyone; a write from a user or a host outside the
list is refused and the PV keeps its value; the same write from the allowed
user and host goes through. And by default only the user who runs the IOC may
write: a client of user ``nobody`` (uid 65534) is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from caproto import AccessRights

from nvmri_bluesky.sim import access, launch

CLIENT = r"""
import json, sys
from caproto.threading.client import Context
pv_name, delta, host, user = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = Context(host_name=host, client_name=user, timeout=10.0)
pv, = ctx.get_pvs(pv_name, timeout=10.0)
pv.wait_for_connection(timeout=10.0)
before = float(pv.read(timeout=10.0).data[0])
try:  # a refused write gets an error from the server, which this client sees as a timeout
    pv.write([before + delta], wait=True, timeout=3.0)
    outcome = "written"
except Exception as err:
    outcome = "refused: " + type(err).__name__
after = float(pv.read(timeout=10.0).data[0])
print(json.dumps({"rights": int(pv.access_rights), "before": before, "after": after,
                  "outcome": outcome}))
ctx.disconnect()
"""


def _client_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EPICS_CA_ADDR_LIST=launch.LOOPBACK, EPICS_CA_AUTO_ADDR_LIST="NO",
               EPICS_CA_SERVER_PORT=str(port))
    return env


def _start_ioc(extra_env: dict[str, str]) -> tuple[subprocess.Popen, int, str]:
    port = launch.find_free_port()
    prefix = launch.unique_prefix()
    env = launch.ioc_env(port)
    for name in (access.ENV_WRITE_USERS, access.ENV_WRITE_HOSTS):
        env.pop(name, None)
    env.update(extra_env)
    process = subprocess.Popen([sys.executable, "-m", "nvmri_bluesky.sim.ioc", "--prefix",
                                prefix, "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while "IOC ready" not in line:
        line = process.stdout.readline()
        if not line and process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"IOC did not start: {line}")
    return process, port, prefix


@pytest.fixture(scope="module")
def guarded_ioc() -> Iterator[tuple[int, str]]:
    process, port, prefix = _start_ioc({access.ENV_WRITE_USERS: "alice",
                                        access.ENV_WRITE_HOSTS: "console1"})
    try:
        yield port, prefix
    finally:
        process.terminate()
        process.wait(10)


def _put(port: int, pv: str, delta: float, host: str, ca_user: str,
         **popen: Any) -> dict[str, Any]:
    """Add ``delta`` to the PV as ``ca_user`` on ``host`` (CA handshake); what it saw."""
    result = subprocess.run([sys.executable, "-c", CLIENT, pv, repr(delta), host, ca_user],
                            env=_client_env(port), capture_output=True, text=True, timeout=120,
                            **popen)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


READ_ONLY = int(AccessRights.READ)
READ_WRITE = int(AccessRights.READ | AccessRights.WRITE)


@pytest.mark.parametrize(("pv", "delta"), [("STAGE:Z.LLM", 2.0), ("STAGE:X.VAL", 3.0),
                                           ("RF:POWER", -1.0)])
def test_write_outside_the_list_is_refused_and_inside_succeeds(guarded_ioc, pv, delta):
    port, prefix = guarded_ioc
    name = prefix + pv
    for host, user in (("console1", "mallory"), ("laptop7", "alice")):
        refused = _put(port, name, delta, host, user)
        assert refused["rights"] == READ_ONLY, refused
        assert refused["outcome"].startswith("refused"), refused
        assert refused["after"] == refused["before"], refused
    allowed = _put(port, name, delta, "console1", "alice")
    assert allowed["rights"] == READ_WRITE, allowed
    assert allowed["outcome"] == "written", allowed
    assert allowed["after"] == pytest.approx(allowed["before"] + delta), allowed


def test_default_only_the_iocs_user_writes() -> None:
    process, port, prefix = _start_ioc({})  # default policy: the IOC's own user
    try:
        me = access.policy_from_env({}).write_users
        assert me is not None and len(me) == 1
        user = next(iter(me))
        host = "anyhost"
        # What libca declares for a process of uid 65534 (this machine's Python is not
        # readable by that uid, so the name is declared rather than the uid switched).
        nobody = _put(port, prefix + "STAGE:Z.LLM", 2.0, host, "nobody")
        assert nobody["rights"] == READ_ONLY and nobody["outcome"].startswith("refused"), nobody
        assert nobody["after"] == nobody["before"], nobody
        owner = _put(port, prefix + "STAGE:Z.LLM", 2.0, host, user)
        assert owner["outcome"] == "written", owner
        assert owner["after"] == pytest.approx(owner["before"] + 2.0), owner
    finally:
        process.terminate()
        process.wait(10)


def test_policy_parsing() -> None:
    policy = access.policy_from_env({access.ENV_WRITE_USERS: "Alice, bob",
                                     access.ENV_WRITE_HOSTS: "*"})
    assert policy.write_users == {"alice", "bob"} and policy.write_hosts is None
    assert policy.may_write("anything", "BOB") and not policy.may_write("x", "carol")
    assert access.policy_from_env({access.ENV_WRITE_USERS: "*"}).may_write("h", "anyone")
    assert access.interfaces_from_env({}) == ["127.0.0.1"]
    assert access.interfaces_from_env({access.ENV_INTERFACES: "0.0.0.0"}) == ["0.0.0.0"]
