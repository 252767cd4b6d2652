"""Model weights from a local path or a URL: sha256-verified, downloaded once, cached.

Downloads stream to a temporary name in the cache folder and are renamed only
after the checksum matches, so a cache entry is always a complete, verified file.
The cache is $MAV_WEIGHTS_CACHE, else ~/.cache/mav/weights.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.atomic import replacing

if TYPE_CHECKING:
    import torch


class ChecksumError(ValueError):
    """A weights file whose sha256 is not the expected one."""


class WeightsDownloadError(ConnectionError):
    """Weights behind a URL that could not be fetched whole (nothing is cached)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAV_WEIGHTS_CACHE", Path.home() / ".cache" / "mav" / "weights"))


def is_url(src: str | Path) -> bool:
    return urllib.parse.urlparse(str(src)).scheme in ("http", "https", "file")


def verify(path: Path, sha256: str | None, src: str | Path) -> str:
    """Return the file's sha256; raise ChecksumError naming src if it is not `sha256`."""
    with open(path, "rb") as handle:  # hashlib alone: this module stays free of the ingest's imports
        actual = hashlib.file_digest(handle, "sha256").hexdigest()
    if sha256 and actual.lower() != sha256.lower():
        raise ChecksumError(
            f"weights {src}: sha256 mismatch (expected {sha256.lower()}, got {actual}); "
            "the file is corrupt, truncated or not the expected model"
        )
    return actual


def resolve_weights(src: str | Path, sha256: str | None = None, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """Local path of verified weights for `src` (a path or URL) and their sha256."""
    if not is_url(src):
        path = Path(src).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights {src}: no such file")
        return path, verify(path, sha256, src)

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = Path(urllib.parse.urlparse(str(src)).path).name or "weights"
    # keyed by the expected checksum when known, else by the URL
    key = sha256.lower() if sha256 else hashlib.sha256(str(src).encode()).hexdigest()[:16]
    target = cache / key / name
    if target.is_file():
        return target, verify(target, sha256, target)
    with replacing(target) as tmp:  # cached whole and verified, or not at all
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(str(src), timeout=60) as resp:
                declared = resp.headers.get("Content-Length")
                shutil.copyfileobj(resp, out, 1 << 20)
                received = out.tell()
        except (OSError, http.client.HTTPException) as err:  # URLError and HTTPError are OSErrors
            raise WeightsDownloadError(f"weights {src}: download failed ({err})") from None
        if declared is not None and received != int(declared):  # without a checksum it would be cached
            raise WeightsDownloadError(f"weights {src}: download cut short ({received} of {declared} bytes)")
        digest = verify(tmp, sha256, src)
    return target, digest


def is_torchscript(path: Path) -> bool:
    """Is the file a saved TorchScript module (a zip holding code), not a state dict?"""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def load_torchscript(path: Path, src: str | Path, name: str, device, problem) -> torch.jit.ScriptModule:
    """The TorchScript module at `path`, called once on a tiny uint8 video [1,3,16,32,32] (StyleGAN-V's
    modules resize it themselves) by `problem(module, video)`, which says what is wrong with the output,
    if anything: a module of another kind is a ValueError naming `src` here, not a traceback from deep
    inside the scoring."""
    import torch

    try:
        module = torch.jit.load(str(path), map_location=device).eval()
        with torch.no_grad():
            why = problem(module, torch.zeros(1, 3, 16, 32, 32, dtype=torch.uint8, device=device))
    except torch.cuda.OutOfMemoryError:  # the device's fault, not the file's
        raise
    except Exception as err:  # noqa: BLE001 - whatever a module of another kind raises on that input
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = lines[-1] if lines else type(err).__name__  # TorchScript's own reason comes after its traces
    if why:
        raise ValueError(f"weights {src}: not StyleGAN-V's {name} ({why})")
    return module


def module_device(module) -> torch.device:
    """The device of a loaded network's weights (CPU for one without any: a TorchScript stand-in in tests)."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def check_state_fits(state: dict, own: dict, src: str | Path, what: str, may_miss=lambda key: False) -> dict:
    """`state` when it loads into a module whose state is `own`, else a ValueError naming `src`
    as not `what` and what does not fit (e.g. a head of another class count)."""
    from models.compat import state_misfits

    if problems := state_misfits(own, state, may_miss):
        raise ValueError(f"weights {src}: not {what} ({'; '.join(problems)})")
    return state


def load_state_dict(path: Path, src: str | Path) -> dict:
    """A state dict saved by torch.save (tensors only); a file that is not one is a ValueError naming `src`."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - pickle, zip and weights_only errors are all "not a state dict"
        raise ValueError(f"weights {src}: not a readable PyTorch state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights {src}: not a state dict (a {type(state).__name__})")
    return state
