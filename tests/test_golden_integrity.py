"""The golden store: verify passes on the committed store and catches every kind of damage;
regen is deterministic, atomic and refuses non-determinism."""

import json
import shutil

import pytest
import torch

from attncheck import cases, golden

pytestmark = pytest.mark.smoke


def test_committed_store_verifies():
    assert golden.verify() == []


def test_committed_store_stays_small():
    manifest = golden.read_manifest()
    total = sum(e["size_bytes"] for e in manifest["cases"].values())
    assert total < 40 * 2**20, f"golden/ is {total / 2**20:.1f} MiB; the limit is 40 MB"


def test_manifest_is_sorted_and_records_conventions_and_provenance():
    m = golden.read_manifest()
    assert list(m["cases"]) == sorted(m["cases"])
    assert m["conventions"]["causal_alignment"] == "bottom_right"
    for name, e in m["cases"].items():
        assert e["provenance"]["reference_precision"] == "float64-cpu-1thread", name
        assert set(e["rule"]) == {"k_row", "k_mean"}, name


@pytest.fixture
def store_copy(tmp_path):
    root = tmp_path / "golden"
    shutil.copytree(golden.golden_dir(), root, ignore=shutil.ignore_patterns(".lock"))
    return root


def _some_case():
    return cases.get_case("decode-h8x2-d64-bs16-bf16")


def test_flipped_byte_is_reported_with_file_and_tensor(store_copy):
    case = _some_case()
    path = golden.case_path(case, store_copy)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the last tensor's data
    path.write_bytes(bytes(data))
    problems = [p for p in golden.verify(store_copy) if "fails its hash" in p]
    assert len(problems) == 1
    assert case.name in problems[0] and "fails its hash" in problems[0] and "tensor" in problems[0]
    with pytest.raises(golden.GoldenError, match="fails its hash"):
        golden._VERIFIED.clear()
        golden.load(case, store_copy)


def test_missing_and_orphan_files_are_reported(store_copy):
    case = _some_case()
    golden.case_path(case, store_copy).unlink()
    (store_copy / "mha" / "stray.safetensors").write_bytes(b"x")
    problems = "\n".join(golden.verify(store_copy))
    assert f"case {case.name}: file" in problems and "is missing" in problems
    assert "orphan golden file" in problems and "stray.safetensors" in problems


def test_manifest_drift_from_catalogue_is_reported(store_copy):
    m = json.loads((store_copy / golden.MANIFEST_NAME).read_text())
    m["cases"][_some_case().name]["params"]["seed"] = 12345
    (store_copy / golden.MANIFEST_NAME).write_text(json.dumps(m))
    assert any("differ from the catalogue" in p for p in golden.verify(store_copy))


def test_regen_check_reports_no_change_on_a_sound_store(store_copy, capsys):
    name = _some_case().name
    assert golden.regen(names=[name], root=store_copy, check_only=True) == 0
    assert "unchanged" in capsys.readouterr().out


def test_regen_refuses_a_nondeterministic_generator(store_copy, monkeypatch):
    real = golden.generate
    calls = {"n": 0}

    def flaky(case):
        t = real(case)
        calls["n"] += 1
        t["expected.output"] = t["expected.output"] + calls["n"] * 1e-3
        return t

    monkeypatch.setattr(golden, "generate", flaky)
    before = {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file()}
    with pytest.raises(golden.GoldenError, match="differ byte-wise in \\['expected.output'\\]"):
        golden.regen(names=[_some_case().name], root=store_copy)
    after = {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {p: b for p, b in before.items() if p.name != ".lock"} == after  # nothing written


def test_regen_failure_midway_leaves_nothing_half_written(store_copy, monkeypatch):
    real = golden.generate
    names = sorted(c.name for c in golden.stored_cases())[:3]

    def dies_on_third(case):
        if case.name == names[2]:
            raise KeyboardInterrupt("simulated crash")
        return real(case)

    monkeypatch.setattr(golden, "generate", dies_on_third)
    before = {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(KeyboardInterrupt):
        golden.regen(names=names, root=store_copy)
    after = {p: p.read_bytes() for p in store_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after
    assert not list(store_copy.rglob("*.tmp"))


def test_regen_rewrites_a_changed_case_and_prints_a_diff(store_copy, capsys, monkeypatch):
    case = _some_case()
    path = golden.case_path(case, store_copy)
    real = golden.generate

    def shifted(c):
        t = real(c)
        if c.name == case.name:
            t["expected.output"] = t["expected.output"] + 0.5
        return t

    monkeypatch.setattr(golden, "generate", shifted)
    old = path.read_bytes()
    assert golden.regen(names=[case.name], root=store_copy) == 1
    out = capsys.readouterr().out
    assert f"changed    {case.name}: expected.output" in out and "max |new-old| = 5.000e-01" in out
    assert path.read_bytes() != old
    assert not [p for p in golden.verify(store_copy) if case.name in p]  # manifest has the new hashes


def test_regen_refuses_to_run_inside_xdist(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    with pytest.raises(golden.GoldenError, match="single process"):
        golden.regen(names=[_some_case().name])


def test_fp8_tensors_round_trip_through_uint8_storage():
    case = cases.get_case("mixed-h8x2-d64-bs16-fp16-fp8e4m3fnuz")
    t = golden.load(case)
    assert t["key_cache"].dtype == torch.float8_e4m3fnuz
    entry = golden.read_manifest()["cases"][case.name]["tensors"]["key_cache"]
    assert entry["dtype"] == "uint8" and entry["logical_dtype"] == "float8_e4m3fnuz"


def test_stored_inputs_equal_regenerated_inputs():
    """Inputs are stored, never re-drawn at test time; regenerating must reproduce them."""
    case = _some_case()
    stored = golden.load(case)
    fresh = golden.generate(case)
    for k in ("query", "key", "value", "block_table", "slot_mapping"):
        assert torch.equal(stored[k], fresh[k]), k
