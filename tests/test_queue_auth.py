"""The authenticated queue: bluesky-httpserver in front of an encrypted RE Manager.

Brought up in the order of docs/deployment.md: a simulated IOC, the RE Manager
with the profile on the machine's Redis, its control socket on 127.0.0.1 with a
0MQ CURVE key pair, and bluesky-httpserver with the profile's config
(profile_collection/httpserver/config.yml: roles and users -> queue-server
groups), its PAM login replaced by a dictionary login for three test users.
Every request goes over real HTTP through bluesky-queueserver-api's HTTP
``REManagerAPI``. Needs Redis at 127.0.0.1:6379; in CI its absence fails.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from services import require_service

from nvmri_bluesky import testing

pytestmark = [pytest.mark.facility, pytest.mark.timeout(600)]


def _require_redis() -> None:
    require_service(testing.redis_available(), f"Redis at {testing.REDIS_ADDR}")


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    _require_redis()
    logs = tmp_path_factory.mktemp("queue-auth")
    users = {name: (secrets.token_urlsafe(12), role)
             for name, role in (("olga", "operator"), ("ulrich", "user"), ("otto", "observer"))}
    stack: list[Any] = []
    try:
        ioc = testing.start_simulated_ioc("default")
        stack.append(ioc)
        manager = testing.start_re_manager(testing.profile_env(ioc, catalog="none"),
                                           log_dir=logs)
        stack.append(manager)
        http = testing.start_http_server(manager, users=users, log_dir=logs)
        stack.append(http)
        yield SimpleNamespace(manager=manager, http=http, users=users, logs=logs)
    finally:
        for service in reversed(stack):
            service.stop()


def _login(queue: SimpleNamespace, name: str) -> Any:
    return queue.http.api(name, queue.users[name][0])


def _refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``call``; it must fail with an HTTP 401/403; return the error text."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - the API raises its own classes
        call(*args, **kwargs)
    text = str(info.value)
    assert "401" in text or "403" in text or "Not enough permissions" in text, text
    return text


def test_unauthenticated_requests_are_refused(queue: SimpleNamespace) -> None:
    rm = queue.http.api()
    try:
        for call in (rm.status, rm.queue_get, rm.history_get):
            _refused(call)
    finally:
        rm.close()
    with pytest.raises(Exception) as info:  # noqa: PT011
        queue.http.api("olga", "wrong password")
    assert "401" in str(info.value) or "Incorrect" in str(info.value)


def test_observer_reads_status_and_history_only(queue: SimpleNamespace) -> None:
    from bluesky_queueserver_api import BPlan

    rm = _login(queue, "otto")
    try:
        assert rm.status()["manager_state"] == "idle"
        assert "items" in rm.history_get() and "items" in rm.queue_get()
        _refused(rm.item_add, BPlan("odmr_sweep", 6.1e9, 6.35e9, 11))
        _refused(rm.queue_clear)
        _refused(rm.item_move, pos=0, pos_dest=1)
        _refused(rm.environment_open)
        _refused(rm.environment_close)
        _refused(rm.permissions_set, {"user_groups": {}})
        _refused(rm.script_upload, "open('/tmp/nvmri-observer-was-here', 'w')")
        _refused(rm.function_execute, {"name": "print"})
    finally:
        rm.close()
    assert not Path("/tmp/nvmri-observer-was-here").exists()


def test_user_queues_measurements_not_service_plans_or_scripts(queue: SimpleNamespace) -> None:
    from bluesky_queueserver_api import BPlan

    rm = _login(queue, "ulrich")
    try:
        added = rm.item_add(BPlan("odmr_sweep", 6.1e9, 6.35e9, 11))
        assert added["success"], added
        with pytest.raises(Exception) as info:  # noqa: PT011 - refused by the queue server
            rm.item_add(BPlan("set_z_min", 2.0))
        assert "set_z_min" in str(info.value) and "not in the list of allowed" in str(
            info.value), str(info.value)
        _refused(rm.script_upload, "import os")
        _refused(rm.permissions_set, {"user_groups": {}})
        assert rm.item_remove(uid=added["item"]["item_uid"])["success"]
    finally:
        rm.close()


def test_operator_queues_service_plans(queue: SimpleNamespace) -> None:
    from bluesky_queueserver_api import BPlan

    rm = _login(queue, "olga")
    try:
        added = rm.item_add(BPlan("set_z_min", 2.0))
        assert added["success"], added
        queued = rm.queue_get()["items"]
        assert [i["name"] for i in queued][-1] == "set_z_min"
        assert queued[-1]["user"] == "olga" and queued[-1]["user_group"] == "operator"
        rm.queue_clear()
        assert rm.queue_get()["items"] == []
    finally:
        rm.close()


def test_zmq_client_without_the_key_is_refused(queue: SimpleNamespace) -> None:
    from bluesky_queueserver_api.zmq import REManagerAPI

    assert queue.manager.public_key
    keyless = REManagerAPI(zmq_control_addr=queue.manager.control_addr, timeout_recv=3.0,
                           timeout_send=3.0)
    try:
        with pytest.raises(Exception) as info:  # noqa: PT011
            keyless.status()
        assert "timeout" in type(info.value).__name__.lower() or "timeout" in str(info.value)
    finally:
        keyless.close()
    keyed = queue.manager.api(timeout_recv=30.0)
    try:
        assert keyed.status()["manager_state"] == "idle"
    finally:
        keyed.close()
