"""Fill a Hugging Face hub cache by hand, the way huggingface_hub lays it out, with no network.

    <hub_cache>/models--<owner>--<name>/blobs/<sha256 of the file>
                                       /snapshots/<commit>/<file>  -> ../../blobs/<sha256> (symlink, or a copy)
                                       /refs/main                  <commit>

With HF_HUB_OFFLINE=1 and HF_HUB_CACHE (or HF_HOME/hub) pointing there, `transformers.GPT2LMHeadModel.from_pretrained
("gpt2")`, `huggingface_hub.snapshot_download("gpt2", local_files_only=True)` and `gpt2lab.weights.resolve("gpt2")`
all find the files. Used by test_weights and by the real-mode notebook test (gpt2-shaped random weights).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

FILES = ("config.json", "model.safetensors")


def place_in_hub_cache(model_or_folder, hub_cache_dir: Path, repo_id: str = "gpt2") -> Path:
    """Store config.json and model.safetensors of a transformers model (or a save_pretrained folder) in the cache
    under `repo_id`; return the snapshot folder."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, (str, os.PathLike)):
            source = Path(model_or_folder)
        else:
            source = Path(tmp)
            model_or_folder.save_pretrained(source)  # safetensors by default
        repo = Path(hub_cache_dir) / ("models--" + repo_id.replace("/", "--"))
        digests = {name: hashlib.sha256((source / name).read_bytes()).hexdigest() for name in FILES}
        commit = hashlib.sha1("".join(digests.values()).encode()).hexdigest()  # any 40 hex digits will do
        snapshot = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, digest in digests.items():
            blob = repo / "blobs" / digest
            shutil.copyfile(source / name, blob)
            link = snapshot / name
            if link.exists() or link.is_symlink():
                link.unlink()
            try:
                link.symlink_to(Path("..", "..", "blobs", digest))
            except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
                shutil.copyfile(blob, link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
