"""Knowing quickly that the hub cannot be reached (dejavu/hub.py), without touching the network."""

from __future__ import annotations

import socket
import time

import pytest

from dejavu import hub
from dejavu.errors import DejavuError


@pytest.fixture
def fresh(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(hub, "_checked", None)
    # set, not deleted, so that the value hub_offline() writes is undone after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    for var in hub.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    return monkeypatch


def _unreachable(*args, **kwargs):
    raise OSError("no route to host")


def test_an_unreachable_hub_switches_to_the_cache_and_fails_fast(fresh):
    import huggingface_hub.constants as constants

    fresh.setattr(socket, "create_connection", _unreachable)
    assert hub.hub_offline() is True
    assert constants.HF_HUB_OFFLINE is True
    from dejavu.models.loading import load_model

    started = time.perf_counter()
    with pytest.raises(DejavuError, match="the hub cannot be reached and it is not in the local cache"):
        load_model("no-such-org/no-such-model", device="cpu")
    assert time.perf_counter() - started < 20  # not a minute of retries


def test_behind_a_proxy_no_direct_connection_is_tried(fresh):
    fresh.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    fresh.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("tried a direct connection"))
    assert hub.hub_offline() is False


def test_offline_set_by_the_user_is_kept(fresh):
    fresh.setenv("HF_HUB_OFFLINE", "1")
    fresh.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("tried a connection"))
    assert hub.hub_offline() is True
