"""The stored addition model is known to `attncheck golden verify` (hash checked, not an orphan)
and refused when its bytes change."""

from __future__ import annotations

import json
import shutil

import pytest

from attncheck import golden
from attncheck.spot import addition
from attncheck.spot.model import CheckpointError


@pytest.fixture()
def golden_copy(tmp_path):
    root = tmp_path / "golden"
    shutil.copytree(addition.MODELS_DIR, root / "models")
    (root / "MANIFEST.json").write_text(json.dumps({  # an empty store: case problems are not the point here
        "schema_version": golden.SCHEMA_VERSION, "reference_version": golden.REFERENCE_VERSION,
        "conventions": golden.CONVENTIONS, "cases": {}}))
    return root


def model_problems(root) -> list:
    return [p for p in golden.verify(root) if "models" in p]


def test_verify_accepts_the_stored_model(golden_copy):
    assert model_problems(golden_copy) == []


def test_verify_flags_a_changed_model_and_an_unlisted_one(golden_copy):
    weights = golden_copy / "models" / "addition" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (golden_copy / "models" / "stray.safetensors").write_bytes(b"{}")
    problems = model_problems(golden_copy)
    assert any("fails its sha256" in p and "addition" in p for p in problems), problems
    assert any("orphan" in p and "stray.safetensors" in p for p in problems), problems


def test_load_refuses_changed_weights(golden_copy, monkeypatch):
    models = golden_copy / "models"
    weights = models / "addition" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(addition, "MODELS_DIR", models)
    monkeypatch.setattr(addition, "MODEL_DIR", models / "addition")
    with pytest.raises(CheckpointError, match="differs from golden/models/MODELS.json"):
        addition.load()
