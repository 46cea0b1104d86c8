"""Whether the Hugging Face Hub can be used now: the offline switches, and one quick probe.

Without network, the Hub's clients (``datasets``, ``huggingface_hub``'s downloads) retry each
request with back-off before they give up: about 25 s per dataset, with a warning per try, and
again for every model an evaluation runs, even for a dataset they then read from their cache.
hmcl asks once per process instead, with a short timeout (:func:`hub_unreachable`), before it
calls them: what is not cached fails at once with a message that says what was needed and why it
cannot be had; what is cached is read in the clients' offline mode (:func:`offline_mode`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 5.0
_probed: dict[str, Optional[str]] = {}  # endpoint -> why it cannot be reached (None: it answered)


def offline(datasets: bool = False) -> Optional[str]:
    """The environment variable that switches the Hub off (``HF_HUB_OFFLINE``,
    ``TRANSFORMERS_OFFLINE``; with ``datasets`` also ``HF_DATASETS_OFFLINE``), or None."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    for name in names:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def hub_unreachable(datasets: bool = False, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the Hub cannot be reached (an offline switch, see :func:`offline`, or the probe's
    error), or None when it answers. The probe is one HEAD request to the endpoint (``HF_ENDPOINT``), with the Hub
    client's own session (proxies, certificates), asked once per process and endpoint: any HTTP
    answer counts as reachable; a connection, DNS, proxy or timeout error does not."""
    switched = offline(datasets)
    if switched:
        return f"{switched} is set"
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _probed:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(endpoint, timeout=timeout)
            _probed[endpoint] = None
        except Exception as e:  # noqa: BLE001 - transport errors of several client libraries
            said = str(e).splitlines()[0] if str(e) else ""
            _probed[endpoint] = f"{endpoint} cannot be reached: {type(e).__name__}" + (f": {said}" if said else "")
    return _probed[endpoint]


@contextmanager
def offline_mode() -> Iterator[None]:
    """The Hub's clients (``huggingface_hub``, ``datasets``) in their offline mode for the block:
    they read their caches and send no request. (Both read the switch from the environment once, at
    import; the block sets their copies of it and puts them back after.)"""
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
