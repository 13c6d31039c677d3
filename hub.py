"""Reaching the Hugging Face hub, or knowing quickly that it cannot be reached.

Without a network, `from_pretrained` and `load_dataset` retry for a minute or more before failing, even for a
typo. One short connection attempt first tells: when it fails, this process switches to the hub's offline
mode, so what is in the local Hugging Face cache still loads and anything else fails at once.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_checked: bool | None = None


def hub_offline(timeout: float = 3.0) -> bool:
    """True when this process uses the hub's cache only: set so by the user, or switched to it here because
    the hub's host did not answer. Behind a proxy a direct connection proves nothing, so it is not tried."""
    global _checked
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    if _checked is not None:
        return _checked
    _checked = False
    if any(os.environ.get(var) for var in PROXY_VARS):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        _go_offline()
        _checked = True
    return _checked


def _go_offline() -> None:
    # the libraries read the variable at import; the ones already imported get their constant set too
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
