"""Where a CLIP comes from, checked without loading it: no torch, no weights.

Split from models.clip so that a pipeline run that trains nothing (an event below the threshold, a
version already done) checks its CLIP names without importing torch.
"""
from __future__ import annotations

from pathlib import Path


class CLIPLoadError(ValueError):
    """A CLIP name or folder that does not load (a bad input: the commands report it in one line)."""


def existing_or_hub_id(name_or_path: str | Path) -> str:
    src = str(name_or_path)
    if (src.startswith(("/", ".", "~")) or src.count("/") > 1) and not Path(src).expanduser().exists():
        raise CLIPLoadError(f"CLIP {src!r}: no such folder")  # a path, not a hub id (namespace/name)
    return src


def cannot_load(src: str, err: BaseException) -> CLIPLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CLIPLoadError(f"CLIP {src!r} cannot be loaded ({reason}); give a folder holding a CLIP "
                         "(config, weights, tokenizer), a hub id that is cached or reachable, or tiny")


def check_clip(name_or_path: str | Path) -> None:
    """Raise CLIPLoadError where FrozenCLIP.load(name_or_path) surely fails: a missing folder, a
    folder or hub id without a CLIP config, a hub id neither in the local Hugging Face cache nor
    reachable (offline, e.g. a GPU host). Reads the config only (a hub id's is fetched into the
    cache), no weights: for checks before hours of work that end by loading it."""
    if str(name_or_path) == "tiny":
        return
    from transformers import CLIPConfig

    src = existing_or_hub_id(name_or_path)
    folder = Path(src).expanduser()
    if folder.is_dir():  # (transformers reads a folder without a config.json as a default config)
        if not (folder / "config.json").is_file():
            raise cannot_load(src, FileNotFoundError(f"no config.json in {folder}"))
        return
    try:
        CLIPConfig.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise cannot_load(src, err) from None
