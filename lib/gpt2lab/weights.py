"""GPT-2 weights: one setting, found offline in the Hugging Face cache, and one line of ours when they cannot be had.

Used by notebook 02 (gpt2), §5 (`GPT2.from_pretrained` and the transformers reference `load_reference`), by notebook
04 (finetune) in real mode, and by notebook 00's environment check (`find_cached`, which never downloads).

The setting (`setting()`): `setup(weights=...)`, else $GPT2LAB_WEIGHTS, else "gpt2". It is a hub name ("gpt2",
"gpt2-medium", "owner/name") or a local folder holding config.json and model.safetensors (or pytorch_model.bin).

How a hub name is found (`resolve`), so that offline the first loading call fails within seconds:
  1. the Hugging Face cache, under the name *as given* (the cache transformers' own `from_pretrained("gpt2")` fills),
     with `local_files_only=True`: no network at all;
  2. if HF_HUB_OFFLINE is set, stop there;
  3. one TCP connection to the hub (or the proxy), `PROBE_TIMEOUT` seconds at most: huggingface_hub and transformers
     retry a dead connection for about 50 s before giving up, so we ask once ourselves;
  4. only then `snapshot_download`, again under the name as given: one name, one download, one cache entry that
     transformers finds too.
Whatever fails raises `WeightsUnavailable` with one line: what was tried and the ways out.

Layer: this module imports only `data` (for printing paths), so `tokenizer` may use its hub helpers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .data import OneLineError, first_line, shown_path

DEFAULT = "gpt2"
WEIGHTS_ENV = "GPT2LAB_WEIGHTS"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]  # not the TF/Flax/ONNX copies
PROBE_TIMEOUT = 3.0  # seconds to wait for the hub to accept a connection

WAYS_OUT = (
    "Connect to the internet once (the weights are then cached), or set GPT2LAB_WEIGHTS=/path/to/folder "
    "(or setup(weights=...)) to a folder holding config.json and model.safetensors"
)


class WeightsUnavailable(OneLineError, FileNotFoundError):
    """GPT-2 weights that cannot be had: the one-line message says what was tried and what to do.

    Raised by `resolve`, `load_reference` and `GPT2.from_pretrained` (notebook 02, §5).
    """


def setting(name_or_folder: str | os.PathLike | None = None) -> str:
    """The weights setting: the argument, else $GPT2LAB_WEIGHTS, else "gpt2". Read by `setup()` (notebook 00, §1)."""
    value = name_or_folder if name_or_folder not in (None, "") else os.environ.get(WEIGHTS_ENV, "").strip()
    return str(value or DEFAULT)


# ------------------------------------------------------------------------------------------- the Hugging Face hub


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, or was when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ
    return _true(env.get("HF_HUB_OFFLINE")) or _true(env.get("TRANSFORMERS_OFFLINE")) or constants.HF_HUB_OFFLINE


def hub_endpoint() -> str:
    """$HF_ENDPOINT read now (huggingface_hub reads it once, at import), else its default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    from huggingface_hub import constants

    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_unreachable(timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the hub (or the configured proxy) accepts a TCP connection within `timeout` s; else why not.

    One connection, no retries; name resolution runs in a thread too, as it can hang longer than any socket timeout.
    """
    if hub_offline():
        return "not tried (HF_HUB_OFFLINE is set)"
    url = urlsplit(hub_endpoint())
    proxy_keys = ("HTTPS_PROXY", "https_proxy") if url.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[k] for k in (*proxy_keys, "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    target = urlsplit(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else url
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[object] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    via = f" via proxy {host}:{port}" if proxy else ""
    if not outcome:
        return f"unreachable{via} (no answer within {timeout:g} s)"
    if outcome[0] is not None:
        return f"unreachable{via} ({outcome[0]})"
    return None


# ------------------------------------------------------------------------------------------- finding the folder


def missing_files(folder: Path) -> list[str]:
    """What `folder` lacks to be a GPT-2 checkpoint: config.json and/or a weights file."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    return missing


def looks_like_folder(name: str) -> bool:
    """True for a setting that can only be a folder: hub names are "gpt2" or "owner/name", nothing else."""
    return name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name or name.count("/") > 1


def find_cached(name: str) -> Path | None:
    """The snapshot folder of hub name `name` in the Hugging Face cache, complete (config + weights), or None.

    Never touches the network. Used by `resolve` and by notebook 00's environment check.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                name, allow_patterns=[*HUB_PATTERNS, "pytorch_model.bin"], local_files_only=True,
                cache_dir=hub_cache_dir(),
            )
        )  # fmt: skip
    except Exception:  # not cached, or not a valid repo id: either way, not here
        return None
    return None if missing_files(folder) else folder


def _download(name: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=cache, etag_timeout=PROBE_TIMEOUT))
        if missing_files(folder):  # an older repo with only pytorch_model.bin
            folder = Path(
                snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin"], cache_dir=cache,
                                  etag_timeout=PROBE_TIMEOUT)
            )  # fmt: skip
    except Exception as err:
        what = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsUnavailable(
            f"no GPT-2 weights {name!r}: Hugging Face cache at {shown_path(cache)}: no {name!r}; "
            f"hub {hub_endpoint()}: {type(err).__name__}: {what}. Check the name; {WAYS_OUT}"
        ) from None
    if missing_files(folder):
        raise WeightsUnavailable(
            f"no GPT-2 weights {name!r}: the hub repo has no {' and no '.join(missing_files(folder))}. "
            "Use a GPT-2 repo such as 'gpt2', or a local folder holding config.json and model.safetensors"
        )
    return folder


def _damaged(file: Path, err: Exception) -> WeightsUnavailable:
    real = Path(os.path.realpath(file))
    cache = next((p for p in real.parents if p.name.startswith("models--")), None)
    if cache is not None:
        fix = f"delete {cache} and load again to download it afresh"
    else:
        fix = "delete it and save or copy it again"
    return WeightsUnavailable(f"GPT-2 weights file {file} is damaged ({first_line(err)}): {fix}")


def check_files(folder: Path) -> None:
    """Raise `WeightsUnavailable` naming a damaged *.safetensors file in `folder`; never touches the network.

    A safetensors header lists every tensor's byte range; reading it catches a truncated download at once. Used by
    `resolve` and by notebook 00's environment check.
    """
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:
            raise _damaged(file, err) from None


def resolve(name_or_folder: str | os.PathLike | None = None) -> Path:
    """A folder holding config.json and model.safetensors (or pytorch_model.bin) for `name_or_folder`.

    Built for notebook 02 (gpt2), §5. None means the setting (`setting()`). A local folder is used as is; a hub name
    is looked up in the Hugging Face cache under that very name, then (unless offline) fetched once. Raises
    `WeightsUnavailable` (one line) when neither works, within about `PROBE_TIMEOUT` seconds offline.
    """
    name = setting(name_or_folder)
    path = Path(name).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise WeightsUnavailable(
                f"no GPT-2 weights in local folder {shown_path(path.resolve())}: it has no {' and no '.join(missing)}. "
                "Save a model there (GPT2LMHeadModel.save_pretrained), or point GPT2LAB_WEIGHTS (or "
                "setup(weights=...)) at a folder that has both, or at a hub name such as 'gpt2'"
            )
        check_files(path)
        return path
    if path.exists() or looks_like_folder(name):
        raise WeightsUnavailable(
            f"no GPT-2 weights: local folder {path.resolve()}: not there. Point GPT2LAB_WEIGHTS (or "
            "setup(weights=...)) at a folder holding config.json and model.safetensors, or at a hub name such as "
            "'gpt2' (needs internet once)"
        )
    cache = hub_cache_dir()
    folder = find_cached(name)
    if folder is None:
        why = hub_unreachable()
        if why is not None:
            raise WeightsUnavailable(
                f"no GPT-2 weights {name!r}: Hugging Face cache at {shown_path(cache)}: no {name!r}; "
                f"hub {hub_endpoint()}: {why}. {WAYS_OUT}"
            )
        folder = _download(name, cache)
    check_files(folder)
    return folder


# ------------------------------------------------------------------------------------------- reading the weights


def read_state_dict(folder: Path) -> dict:
    """The transformers-layout state dict in `folder` (safetensors, sharded safetensors or pytorch_model.bin).

    Used by `GPT2.from_pretrained` (notebook 02, §5). A damaged file raises `WeightsUnavailable` naming it.
    """
    import torch

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    files = [folder / f for f in files] or list(folder.glob("model.safetensors"))
    if files:
        from safetensors.torch import load_file

        state = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as err:
                raise _damaged(f, err) from None
        return state
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:
            raise _damaged(binary, err) from None
    raise WeightsUnavailable(f"no model.safetensors or pytorch_model.bin in {shown_path(folder.resolve())}")


def load_reference(name_or_folder: str | os.PathLike | None = None):
    """transformers' own `GPT2LMHeadModel` (eval mode) with the same weights, for notebook 02's comparisons (§5).

    Loaded from the folder `resolve` found, so transformers never goes to the network (or retries) by itself.
    """
    folder = resolve(name_or_folder)  # first: fails in milliseconds offline; safetensors headers checked there
    from transformers import GPT2LMHeadModel  # importing the modeling code alone takes seconds

    return GPT2LMHeadModel.from_pretrained(str(folder)).eval()
