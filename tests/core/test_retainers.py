"""Retainers: the paths that keep a call site's live clients alive, from module globals, class
attributes, thread frame locals and closures, with real sockets (and a real requests.Session
talking to a loopback HTTP server); the search's bound; guard()'s error; the setting."""

from __future__ import annotations

import gc
import json
import logging
import socket
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

import pytest

import connwatch
from connwatch import _config, _retainers
from tests.conftest import SCHEMA, Server

CLIENTS: Dict[str, List[Any]] = {}
SESSIONS: Dict[str, Any] = {}
HANDLER: Optional[Callable[[], socket.socket]] = None


class Pool:
    conns: List[socket.socket] = []


def validate(data: Dict[str, Any]) -> None:
    __import__("jsonschema").validate(data, json.loads(SCHEMA.read_text()))


def stat_of(snap: Any, function: str, kind: str = "socket") -> Any:
    """The snapshot's statistic for the call site in ``function`` of this file."""
    found = [s for s in snap.statistics("callsite")
             if s.site is not None and s.site.file == __file__ and s.kind == kind
             and s.site.function.split(".")[-1] == function]
    assert len(found) == 1, [(s.kind, s.site) for s in snap.statistics("callsite")]
    return found[0]


# Each helper makes its client in its own frame and leaves it only where the test says: the
# test's frame never holds it (a frame local would be a retainer too).

def park_in_list(key: str, tcp_server: Server) -> None:
    CLIENTS[key] = [None, "x", 3, socket.create_connection(tcp_server.address, timeout=5)]


def park_in_class(tcp_server: Server) -> None:
    Pool.conns.append(socket.create_connection(tcp_server.address, timeout=5))


def make_handler(tcp_server: Server) -> Callable[[], socket.socket]:
    s = socket.create_connection(tcp_server.address, timeout=5)

    def handle() -> socket.socket:
        return s

    return handle


def open_session(http_server: Server) -> None:
    import requests

    SESSIONS["api"] = session = requests.Session()
    session.get(f"http://{http_server.target}/", timeout=5).close()


@pytest.fixture
def clean() -> Any:
    global HANDLER
    yield
    for held in CLIENTS.values():
        for s in held:
            if isinstance(s, socket.socket):
                s.close()
    CLIENTS.clear()
    for s in Pool.conns:
        s.close()
    Pool.conns.clear()
    for session in SESSIONS.values():
        session.close()
    SESSIONS.clear()
    if HANDLER is not None:
        HANDLER().close()
        HANDLER = None


def test_module_global_dict_of_lists(agent: Any, tcp_server: Server, clean: Any, tmp_path: Any) -> None:
    park_in_list("a", tcp_server)
    snap = agent.snapshot(retainers=True)
    stat = stat_of(snap, "park_in_list")
    assert stat.retainers == (f"{__name__}.CLIENTS (dict) ['a'] -> (list) [3]",), snap.extra
    data = snap.to_dict()
    validate(data)
    (row,) = [r for r in data["callsites"] if r["function"] == "park_in_list"]
    assert row["retainers"] == list(stat.retainers)
    search = data["retainers_search"]
    assert search["truncated"] is False and search["limit"] is None
    assert search["found"] >= 1 and 0 < search["visited"] <= search["max_objects"]
    # The JSON round-trips; a snapshot taken without asking has no retainers at all.
    snap.dump(str(tmp_path / "s.json"))
    again = connwatch.Snapshot.load(str(tmp_path / "s.json"))
    assert stat_of(again, "park_in_list").retainers == stat.retainers
    assert again.to_dict()["retainers_search"] == search
    plain = agent.snapshot()
    assert stat_of(plain, "park_in_list").retainers is None
    data = plain.to_dict()
    assert "retainers_search" not in data and not any("retainers" in r for r in data["callsites"])


def test_class_attribute(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_in_class(tcp_server)
    stat = stat_of(agent.snapshot(retainers=True), "park_in_class")
    assert stat.retainers == (f"{__name__}.Pool.conns (list) [0]",)


def test_closure_cell(agent: Any, tcp_server: Server, clean: Any) -> None:
    global HANDLER
    HANDLER = make_handler(tcp_server)
    stat = stat_of(agent.snapshot(retainers=True), "make_handler")
    assert stat.retainers == (f"{__name__}.HANDLER (function make_handler.<locals>.handle) closure 's'",)


def test_thread_frame_local(agent: Any, tcp_server: Server) -> None:
    ready, done = threading.Event(), threading.Event()

    def hold() -> None:
        conn = socket.create_connection(tcp_server.address, timeout=5)
        ready.set()
        done.wait(30)
        conn.close()

    t = threading.Thread(target=hold, name="holder", daemon=True)
    t.start()
    try:
        assert ready.wait(10)
        stat = stat_of(agent.snapshot(retainers=True), "hold")
        assert stat.retainers == ("thread 'holder' frame hold() local conn",)
    finally:
        done.set()
        t.join(10)


def test_requests_session_to_a_real_server(agent: Any, http_server: Server, clean: Any) -> None:
    open_session(http_server)
    snap = agent.snapshot(retainers=True)
    session = stat_of(snap, "open_session", "requests.Session")
    assert session.retainers == (f"{__name__}.SESSIONS (dict) ['api']",)
    # The pooled connection's socket, through the session's adapter and pool.
    sock = [s for s in snap.statistics("callsite") if s.kind == "socket" and s.role == "client"
            and s.site is not None and s.site.function == "open_session"]
    assert sock and sock[0].retainers, [(s.kind, s.role, s.site) for s in snap.statistics("callsite")]
    path = sock[0].retainers[0]
    assert path.startswith(f"{__name__}.SESSIONS (dict) ['api'] -> (Session) .adapters -> (OrderedDict) ['http://'] "
                           "-> (HTTPAdapter) .poolmanager -> (PoolManager) .pools"), path
    assert path.endswith("(HTTPConnection) .sock"), path


class Client:
    __slots__ = ("conn",)


class Service:
    def __init__(self, conn: socket.socket) -> None:
        self.client = Client()
        self.client.conn = conn


def stream(tcp_server: Server) -> Any:
    conn = socket.create_connection(tcp_server.address, timeout=5)
    yield 1
    conn.close()


def make_service(tcp_server: Server) -> None:
    SESSIONS["svc"] = Service(socket.create_connection(tcp_server.address, timeout=5))


def start_stream(tcp_server: Server) -> None:
    SESSIONS["gen"] = gen = stream(tcp_server)
    next(gen)


def test_attributes_slots_and_a_suspended_generator(agent: Any, tcp_server: Server) -> None:
    make_service(tcp_server)
    start_stream(tcp_server)
    try:
        snap = agent.snapshot(retainers=True)
        assert stat_of(snap, "make_service").retainers == (
            f"{__name__}.SESSIONS (dict) ['svc'] -> (Service) .client -> (Client) .conn",)
        assert stat_of(snap, "stream").retainers == (
            f"{__name__}.SESSIONS (dict) ['gen'] -> (generator stream) local conn",)
    finally:
        SESSIONS.pop("svc").client.conn.close()
        SESSIONS.pop("gen").close()


def park_by_secret_keys(tcp_server: Server) -> None:
    a = socket.create_connection(tcp_server.address, timeout=5)
    b = socket.create_connection(tcp_server.address, timeout=5)
    CLIENTS["tokens"] = [{"9f8e7d6c5b4a39281706f5e4d3c2b1a0": a, "https://user:hunter2@api.example.com/v1": b}]


def test_secret_looking_keys_are_not_shown(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_by_secret_keys(tcp_server)
    try:
        snap = agent.snapshot(retainers=True)
        paths = [p for s in snap.statistics() if s.site is not None and s.site.function == "park_by_secret_keys"
                 for p in s.retainers or ()]
        text = " ".join(paths)
        assert f"{__name__}.CLIENTS (dict) ['tokens'] -> (list) [0] -> (dict) [<str len 32>]" in paths, paths
        assert "['https://***@api.example.com/v1']" in text, paths
        assert "9f8e7d6c" not in text and "hunter2" not in text
    finally:
        for s in CLIENTS.pop("tokens")[0].values():
            s.close()


def park_in_a_big_dict(tcp_server: Server) -> None:
    # More members than one batch takes (8,192): expanded, and its holder found, a slice at a time.
    big: Dict[int, List[Any]] = {i: [i] for i in range(20_000)}
    big[19_999].append(socket.create_connection(tcp_server.address, timeout=5))
    CLIENTS["big"] = [big]


def test_a_client_deep_in_a_big_container(agent: Any, tcp_server: Server) -> None:
    park_in_a_big_dict(tcp_server)
    try:
        stat = stat_of(agent.snapshot(retainers=True), "park_in_a_big_dict")
        assert stat.retainers == (f"{__name__}.CLIENTS (dict) ['big'] -> (list) [0] -> (dict) [19999] -> (list) [1]",)
    finally:
        CLIENTS.pop("big")[0][19_999][1].close()


def test_two_holders_two_paths(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_in_list("a", tcp_server)
    Pool.conns.append(CLIENTS["a"][3])
    stat = stat_of(agent.snapshot(retainers=True), "park_in_list")
    assert set(stat.retainers) == {f"{__name__}.CLIENTS (dict) ['a'] -> (list) [3]",
                                   f"{__name__}.Pool.conns (list) [0]"}
    Pool.conns.clear()


def test_the_bound_is_hit_and_reported(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_in_list("a", tcp_server)
    snap = agent.snapshot(retainers=True, max_objects=50)
    data = snap.to_dict()
    validate(data)
    search = data["retainers_search"]
    assert search["truncated"] is True and search["limit"] == "objects", search
    assert search["visited"] <= 50 and search["max_objects"] == 50
    assert isinstance(stat_of(snap, "park_in_list").retainers, tuple)
    timed = agent.snapshot(retainers=True, max_ms=0).to_dict()["retainers_search"]
    assert timed["truncated"] is True and timed["limit"] == "time", timed


def test_no_reference_is_left_behind(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_in_list("a", tcp_server)
    # (Not bound to a local of this frame: on Python 3.12 and older, reading a frame's locals
    # caches them in the frame, which the README says.)
    # With the collector off, a reference cycle left behind (a frame that holds itself) would
    # keep the search's lists, and the client, alive here.
    gc.disable()
    try:
        before = sys.getrefcount(CLIENTS["a"][3])
        for _ in range(3):
            agent.snapshot(retainers=True)
        after = sys.getrefcount(CLIENTS["a"][3])  # (not inside the assert: pytest's rewrite holds one)
        assert after == before
    finally:
        gc.enable()


def test_connwatch_itself_is_never_a_retainer(agent: Any, tcp_server: Server) -> None:
    from connwatch import _registry

    def park() -> None:
        _registry.__dict__["_test_parked"] = socket.create_connection(tcp_server.address, timeout=5)

    park()
    try:
        stat = stat_of(agent.snapshot(retainers=True), "park")
        assert stat.retainers == ()  # searched (the site has live clients), nothing outside connwatch holds it
    finally:
        _registry.__dict__.pop("_test_parked").close()


def test_the_search_never_raises(agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def __iter__(self) -> Any:
            raise RuntimeError("boom")

    caplog.set_level(logging.WARNING, logger="connwatch")
    for _ in range(2):
        paths, info = _retainers.search([("socket", None, object(), Broken())])  # type: ignore[list-item]
        assert not any(paths.values()) and info["truncated"] is True and info["limit"] == "error"
    logged = [r for r in caplog.records if "retainer search" in r.getMessage()]
    assert len(logged) == 1  # logged once


def test_guard_error_names_the_retainer(agent: Any, tcp_server: Server, clean: Any) -> None:
    with pytest.raises(connwatch.LeakError) as caught:
        with connwatch.guard(grace=0):
            park_in_list("b", tcp_server)
    path = f"{__name__}.CLIENTS (dict) ['b'] -> (list) [3]"
    (leak,) = caught.value.leaks
    assert leak.retainers == (path,)
    assert f"    held by: {path}" in str(caught.value)


def test_guard_says_when_no_path_is_found(agent: Any, tcp_server: Server) -> None:
    from connwatch import _registry

    def park() -> None:
        _registry.__dict__["_test_parked"] = socket.create_connection(tcp_server.address, timeout=5)

    try:
        with pytest.raises(connwatch.LeakError) as caught:
            with connwatch.guard(grace=0):
                park()
        assert "held by: no path found from module globals" in str(caught.value)
    finally:
        _registry.__dict__.pop("_test_parked").close()


def test_the_setting() -> None:
    assert _config.load({}).retainers is False
    assert _config.load({"CONNWATCH_RETAINERS": "1"}).retainers is True
    assert _config.load({}, {"retainers": True}).retainers is True
    assert _config.load({"CONNWATCH_RETAINERS": "maybe"}).retainers is False  # warned, default


def test_suspected_only_searches_nothing_without_a_suspect(agent: Any, tcp_server: Server, clean: Any) -> None:
    park_in_list("a", tcp_server)
    from connwatch import _snapshot

    snap = _snapshot.take(retainers="suspected")
    assert "retainers_search" not in snap.to_dict()
    assert stat_of(snap, "park_in_list").retainers is None
    gc.collect()
