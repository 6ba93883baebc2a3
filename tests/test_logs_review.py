"""Found by a review, with real parts: the gateway's `/api/plugins/{id}/logs` left out every line of a level it did
not know (a plugin's own NOTICE reached the lab's log tab live, never in its history), so here a real plugin, in the
gateway and in a worker, logs at levels of its own through a real gateway; and a plugin's telemetry snapshot, cached
a moment for the list routes, outlived the sample after it (the history, and the listing after, repeated the
previous round), here with a real `Telemetry`."""

from __future__ import annotations

import logging
import os
import textwrap
import time
from collections.abc import Iterator

import pytest
from gateway_harness import Gateway, start_gateway, wait_for
from helpers import register_plugins

from bkg_kernel.errors import InvalidInput
from bkg_kernel.runtime.telemetry import LogRing, Telemetry

LOUD = '''
    import logging

    from bkg_kernel.runtime.contract import Plugin

    logging.addLevelName(25, "NOTICE")
    logging.addLevelName(35, "ALERT")


    class Loud(Plugin):
        """Logs a line at levels of its own when it starts."""

        id = "PLUGIN_ID"
        name = "Loud"
        version = "0.1.0"
        description = "Logs at levels of its own."
        mode = "MODE"

        def start(self) -> None:
            self.log.info("INFO line")
            self.log.log(25, "NOTICE line")
            self.log.warning("WARNING line")
            self.log.log(33, "unnamed line")  # logging names it "Level 33"
            self.log.log(35, "ALERT line")
            self.log.error("ERROR line")
            # a level registered only where the plugin runs (in a worker: not in the gateway)
            logging.addLevelName(22, "DETAIL" + "MODE".upper())
            self.log.log(22, "DETAIL line")


    PLUGIN = Loud
'''
PLUGINS = {"loudinline": "inline", "loudworker": "worker"}
MESSAGES = ["INFO line", "NOTICE line", "WARNING line", "unnamed line", "ALERT line", "ERROR line", "DETAIL line"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    site = tmp_path_factory.mktemp("site")
    for pid, mode in PLUGINS.items():
        (site / f"bkg_{pid}.py").write_text(textwrap.dedent(LOUD).replace("PLUGIN_ID", pid).replace("MODE", mode))
    register_plugins(site, "bkg-loud", {pid: f"bkg_{pid}" for pid in PLUGINS})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    g = start_gateway(tmp_path_factory.mktemp("logs") / "data", env=env, plugins=list(PLUGINS))
    try:
        c = g.client()
        for pid in PLUGINS:  # a worker's lines come over its pipe before it says it is ready
            wait_for(lambda pid=pid: c.get(f"/api/plugins/{pid}/status").json()["state"] == "running", timeout=60)
        yield g
    finally:
        g.stop()


def _lines(gw: Gateway, pid: str, **params: str) -> list[tuple[str, str]]:
    r = gw.client().get(f"/api/plugins/{pid}/logs", params={"limit": "2000", **params})
    assert r.status_code == 200, r.text
    return [(x["level"], x["message"]) for x in r.json()["lines"] if x["message"] in MESSAGES]


@pytest.mark.parametrize("pid", list(PLUGINS))
def test_a_plugin_s_own_levels_are_kept_and_ranked_by_their_number(gw: Gateway, pid: str) -> None:
    """Every line is in the history under its level's own name; a floor ranks a plugin's level by its number, as
    logging does (ALERT, 35, is past WARNING; NOTICE, 25, is not), and a floor may be a number."""
    assert _lines(gw, pid) == [
        ("INFO", "INFO line"),
        ("NOTICE", "NOTICE line"),
        ("WARNING", "WARNING line"),
        ("Level 33", "unnamed line"),
        ("ALERT", "ALERT line"),
        ("ERROR", "ERROR line"),
        (f"DETAIL{PLUGINS[pid].upper()}", "DETAIL line"),
    ]
    # DETAIL (22) is below every floor past it, in a worker too, where only the plugin's process could number it
    assert [m for _, m in _lines(gw, pid, level="warning")] == [
        "WARNING line",
        "unnamed line",
        "ALERT line",
        "ERROR line",
    ]
    assert [m for _, m in _lines(gw, pid, level="25")] == MESSAGES[1:-1]
    assert [m for _, m in _lines(gw, pid, level=f"detail{PLUGINS[pid]}")] == MESSAGES[1:]  # its name is a floor
    assert [m for _, m in _lines(gw, pid, level="34")] == ["ALERT line", "ERROR line"]
    assert [m for _, m in _lines(gw, pid, level="error")] == ["ERROR line"]


def test_an_inline_plugin_restarted_logs_each_line_once(gw: Gateway) -> None:
    """Found by a review: each start of an inline plugin added a ring handler to its logger (one per plugin id, for
    the gateway's life) and none went, so after a restart every line reached the history twice."""
    c = gw.client()
    before = [m for _, m in _lines(gw, "loudinline")].count("NOTICE line")
    r = c.post("/api/plugins/loudinline/restart")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert [m for _, m in _lines(gw, "loudinline")].count("NOTICE line") == before + 1


def test_a_level_that_is_none_is_a_422_naming_it(gw: Gateway) -> None:
    r = gw.client().get("/api/plugins/loudinline/logs", params={"level": "loudest"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "level", r.text
    r = gw.client().get("/api/plugins/loudinline/logs", params={"level": "a" * 41})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.level", r.text


def test_the_ring_takes_a_plugin_s_own_level_as_a_floor() -> None:
    """In a notebook's `bkg.local()` the ring is asked directly: a level registered here is a floor too, and a name
    that is no level says so, naming the field."""
    logging.addLevelName(27, "NOTED")
    ring = LogRing()
    for level, message in [("INFO", "a"), ("NOTED", "b"), ("Level 28", "c"), ("SHOUT", "d"), ("WARNING", "e")]:
        ring.add(level, 0.0, message)
    assert [x["message"] for x in ring.query()] == ["a", "b", "c", "d", "e"]
    # SHOUT: named only where the plugin runs (a worker), so unranked here: shown at every floor, not lost
    assert [x["message"] for x in ring.query(level="noted")] == ["b", "c", "d", "e"]
    assert [x["message"] for x in ring.query(level="28")] == ["c", "d", "e"]
    with pytest.raises(InvalidInput) as err:
        ring.query(level="loudest")
    assert err.value.field == "level"


def test_a_sample_ends_the_snapshot_a_listing_cached() -> None:
    """A listing a moment before a sample cached the previous round's numbers: the sample's history point and the
    listing after it repeated them."""
    tel = Telemetry()
    tel.cpu_percent, tel.rss_bytes = 10.0, 1000
    assert tel.snapshot()["cpu_percent"] == 10.0  # a listing: cached
    tel.cpu_percent, tel.rss_bytes = 42.0, 2000  # the next round, as the supervisor measures it
    tel.sample(time.time())
    assert tel.history[-1][1:3] == (42.0, 2000)
    assert (tel.snapshot()["cpu_percent"], tel.snapshot()["rss_bytes"]) == (42.0, 2000)


def test_a_listing_taken_across_a_sample_is_not_served_after_it() -> None:
    """A listing that read the numbers while the supervisor took a sample (on its own thread) cached them after the
    sample's own snapshot: the listings after it showed the older round."""
    tel = Telemetry()
    tel.cpu_percent = 10.0
    rounds: list[float] = []

    def queued() -> int:  # read inside the snapshot, after cpu: the sample happens right here, once
        if not rounds:
            rounds.append(42.0)
            tel.cpu_percent = 42.0
            tel.sample(time.time())
        return 0

    tel.queued = queued
    assert tel.snapshot()["cpu_percent"] == 10.0  # the listing that began before the sample
    assert tel.history[-1][1] == 42.0
    assert tel.snapshot()["cpu_percent"] == 42.0  # the next: the newest round, not the one before
