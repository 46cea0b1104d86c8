"""The Hub's offline switches and the one quick probe of whether it answers."""

from __future__ import annotations

import pytest

from hmcl_cli import hub_access


@pytest.mark.parametrize("value, off", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                        ("0", False), ("false", False), ("", False)])
def test_offline_switches_read_as_huggingface_hub_reads_them(monkeypatch, value, off):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    assert hub_access.offline() == ("TRANSFORMERS_OFFLINE" if off else None)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert hub_access.offline() is None  # a datasets switch only where datasets are read
    assert hub_access.offline(datasets=True) == ("HF_DATASETS_OFFLINE" if off else None)


def test_the_probe_runs_once_per_endpoint_and_any_http_answer_is_reachable(monkeypatch, hub_down):
    from huggingface_hub import constants, utils

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append((url, timeout))
            if url == hub_down:
                raise ConnectionRefusedError("[Errno 111] Connection refused")
            return type("Response", (), {"status_code": 404})()  # an answer, even an error page

    monkeypatch.setattr(utils, "get_session", lambda: Session())
    why = hub_access.hub_unreachable()
    assert why == f"{hub_down} cannot be reached: ConnectionRefusedError: [Errno 111] Connection refused"
    assert hub_access.hub_unreachable() == why and len(asked) == 1  # asked once
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    assert hub_access.hub_unreachable() is None and asked[-1] == ("https://hub.example", hub_access.PROBE_TIMEOUT_S)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the switch wins, with no probe
    assert hub_access.hub_unreachable() == "HF_HUB_OFFLINE is set" and len(asked) == 2


def test_the_real_probe_of_a_closed_port_is_quick(hub_down):
    import time

    t0 = time.perf_counter()
    assert hub_access.hub_unreachable().startswith(f"{hub_down} cannot be reached: ConnectError")
    assert time.perf_counter() - t0 < 3
