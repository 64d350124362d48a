"""What the server cannot serve exactly is refused by name: by `mage store validate`, by
`mage serve` before it binds its port, and when loading if our logits ever differ from the
model's own forward. Never a server that serves wrong numbers or can never become ready."""

from __future__ import annotations

import json
import re

import pytest

from cli.main import main as mage
from model_store import architectures
from model_store.architectures import Architecture
from model_store.builder import build_random_store
from model_store.errors import StoreError
from model_store.loader import load_store
from model_store.validate import check_store
from tests.tiny_architectures import write_tiny_base


def edit_base_config(store, **changes) -> None:
    path = store / "base/config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


REFUSALS = [
    ({"model_type": "xlnet"}, r"model_type 'xlnet' is not an architecture this server is tested"),
    (
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
        r"quantized checkpoints \(quant_method='bitsandbytes'\) are not served",
    ),
    (
        {"layer_types": ["full_attention", "linear_attention"]},
        r"layers of kind \['linear_attention'\]: only full and sliding-window attention",
    ),
    (
        {"layer_types": ["chunked_attention", "full_attention"], "attention_chunk_size": 4},
        r"layers of kind \['chunked_attention'\]",
    ),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_unservable_bases_are_refused_by_name(store_copy, change, message):
    edit_base_config(store_copy, **change)
    with pytest.raises(StoreError, match=r"base/config.json: .*" + message):
        check_store(store_copy)


@pytest.mark.parametrize(("change", "message"), REFUSALS[:1] + REFUSALS[2:3])
def test_validate_and_serve_refuse_before_binding(store_copy, capsys, change, message):
    edit_base_config(store_copy, **change)
    assert mage(["store", "validate", str(store_copy)]) == 1
    assert re.search(message, capsys.readouterr().err)
    # serve checks the store first and returns 2 without ever starting uvicorn
    assert mage(["serve", "--store", str(store_copy), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "mage serve: bad store" in err and re.search(message, err)


def test_loading_refuses_logits_that_differ_from_the_models_own(tmp_path, monkeypatch):
    """The load-time check: were Cohere's logit_scale forgotten, loading would refuse."""
    root = tmp_path / "store"
    write_tiny_base(root / "base", "cohere")
    build_random_store(root, {"path": "base"}, ["a", "b"], value_kind=None)
    load_store(root, "cpu", "float32")  # the real entry applies the scale: loads
    forgetful = Architecture("cohere", "Cohere without its scale", head="plain")
    monkeypatch.setitem(architectures.ARCHITECTURES, "cohere", forgetful)
    with pytest.raises(StoreError, match="differ from the model's own forward"):
        load_store(root, "cpu", "float32")
