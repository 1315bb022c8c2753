"""``hf-hub:org/name[@rev]`` references: telling one apart and fetching it through the Hub cache
(``run/load.py`` reads such a folder like a local export; ``run/hub.py`` writes and uploads them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from vlprompt.errors import VlpromptError
from vlprompt.run.layout import HUB_FILES, PROMPT

PREFIX = "hf-hub:"
#: the files of a prompt on the Hub (everything else in a repository is ignored when downloading)
FILES = list(HUB_FILES)


def is_hub_ref(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` -> (repo id, revision)."""
    body = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
    repo, _, revision = body.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise VlpromptError(f"'{ref}' is not a Hub reference; write hf-hub:ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def download(ref: str) -> Path:
    """The local folder of ``hf-hub:org/name[@rev]`` (downloaded once, then from the Hub cache)."""
    repo, revision = parse_ref(ref)
    offline = is_offline()
    try:
        path = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=FILES,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
            library_name="vlprompt",
        )
    except Exception as e:  # noqa: BLE001 -- not cached offline, unknown repo, network: one line each
        if offline:
            raise VlpromptError(
                f"{ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it once with "
                "a network (unset HF_HUB_OFFLINE) or pass a local export folder"
            ) from None
        raise VlpromptError(
            f"cannot fetch {ref} from the Hugging Face Hub ({type(e).__name__}); check the name, your "
            "network and (for a private repository) `huggingface-cli login`"
        ) from None
    folder = Path(path)
    if not (folder / PROMPT).is_file():
        raise VlpromptError(f"{ref} holds no {PROMPT}: it is not a vlprompt prompt repository")
    return folder
