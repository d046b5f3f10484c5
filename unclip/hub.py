"""The Hugging Face Hub as unclip reaches it: offline when HF_HUB_OFFLINE is set or the Hub's host does not resolve.

    path = hub_file("timm/vit_base_patch32_clip_224.openai", ["open_clip_model.safetensors"])   # cached or downloaded
    if (reason := offline_reason()) is not None: ...                                            # only the cache counts

huggingface_hub retries a host it cannot reach for about 25 s before it fails on a file it has not cached. Where no
name resolves (no network) that wait buys nothing, so here such a machine counts as offline: a file is asked of the
local cache only (`local_files_only`), and one that is not cached fails at once. Nothing here changes another
library's settings: HF_HUB_OFFLINE is read, never written.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

__all__ = ["PROXY_VARIABLES", "HubOfflineError", "hub_file", "is_offline", "offline_reason"]

# With a proxy, the proxy resolves host names, not this machine: its failing to resolve says nothing.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class HubOfflineError(FileNotFoundError):
    """A file that only the Hub could give, not in the local cache while the Hub is offline."""


def offline_reason() -> str | None:
    """Why the Hub counts as offline, in words, or None when it may be asked: HF_HUB_OFFLINE is set, or (with no
    proxy configured) the Hub's host name does not resolve on this machine."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    if host is None or any(os.environ.get(v) for v in PROXY_VARIABLES) or _resolves(host):
        return None
    return "the Hugging Face Hub's host does not resolve"


def is_offline() -> bool:
    """Whether only the local cache may be asked (see `offline_reason`)."""
    return offline_reason() is not None


def hub_file(repo_id: str, filenames: Sequence[str]) -> Path:
    """The first of `filenames` that the Hub model repository `repo_id` holds, as a local file from the cache (asked
    alone when offline) or downloaded into it.

    A name the repository lacks is passed over. Offline, a file in none of the names' cache entries is a
    HubOfflineError; online, a Hub that cannot be reached fails at the first name (huggingface_hub's errors, all
    OSErrors), without asking for the others."""
    reason = offline_reason()
    missing: OSError | None = None
    for name in filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, local_files_only=reason is not None))
        except RemoteEntryNotFoundError as e:  # online: the repository has no such file
            missing = e
        except LocalEntryNotFoundError:  # offline: not cached (online it means the Hub could not be reached)
            if reason is None:
                raise
    if reason is not None:
        raise HubOfflineError(f"{repo_id} ({' or '.join(filenames)}) is not in the local cache and {reason}")
    raise missing


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return True
