"""The golden store: verify passes on the committed store and catches every kind of damage;
regen is deterministic, atomic and refuses non-determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attncheck import cases, golden
from tests.store_damage import MANIFEST_DAMAGE, copy_store, files, rewrite_case

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
    return copy_store(tmp_path / "golden")


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


# ---- a store regen cannot read is refused; nothing it did not write is deleted without --prune ----

def _case_files(root):
    """The store's case files (the spot-check model weights under models/ are not cases)."""
    return sorted(p for p in files(root) if p.endswith(".safetensors") and not p.startswith("models/"))


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
@pytest.mark.parametrize("check_only", [False, True], ids=["write", "check"])
def test_regen_refuses_a_manifest_it_cannot_read_and_changes_nothing(store_copy, damage, check_only):
    MANIFEST_DAMAGE[damage](store_copy / golden.MANIFEST_NAME)
    before = files(store_copy)
    with pytest.raises(golden.GoldenError, match="MANIFEST.json") as e:
        golden.regen(names=[_some_case().name], root=store_copy, check_only=check_only)
    assert "\n" not in str(e.value)
    assert files(store_copy) == before


@pytest.fixture
def two_case_catalogue(monkeypatch):
    """The catalogue shrinks to two cases whose goldens come from the committed store (fast), so
    every other stored case is stale and its file would be deleted by a full regen."""
    names = ["decode-h8x2-d64-bs16-bf16", "merge-finite-fp32-h4-d64"]
    monkeypatch.setattr(golden, "stored_cases", lambda: [cases.get_case(n) for n in names])
    committed = golden.golden_dir()
    monkeypatch.setattr(golden, "generate", lambda case: golden.load(case, committed))
    return names


@pytest.mark.parametrize("check_only", [False, True], ids=["write", "check"])
def test_regen_without_prune_deletes_nothing_and_says_what_it_would_delete(store_copy, two_case_catalogue,
                                                                           check_only, capsys):
    (store_copy / "mha" / "stray.safetensors").write_bytes(b"not a golden")
    golden_files = _case_files(store_copy)
    before = files(store_copy)
    golden.regen(root=store_copy, check_only=check_only)
    out = capsys.readouterr().out
    after = files(store_copy)
    assert _case_files(store_copy) == golden_files
    assert {p: b for p, b in after.items() if p.endswith(".safetensors")} == \
           {p: b for p, b in before.items() if p.endswith(".safetensors")}
    would_delete = [line for line in out.splitlines() if "would delete" in line]
    assert len(would_delete) == len(golden_files) - len(two_case_catalogue)
    assert all("pass --prune to delete it" in line for line in would_delete)
    assert any("stray.safetensors (orphan" in line for line in would_delete)
    if check_only:
        assert after == before


def test_regen_with_a_missing_manifest_keeps_every_other_file(store_copy, capsys):
    """The issue's probe with the manifest gone instead of truncated: a one-case regen writes
    that case and a new manifest, and lists (does not delete) the other files."""
    (store_copy / golden.MANIFEST_NAME).unlink()
    before = _case_files(store_copy)
    golden.regen(names=[_some_case().name], root=store_copy)
    assert _case_files(store_copy) == before
    assert capsys.readouterr().out.count("would delete") == len(before) - 1


def test_regen_with_prune_deletes_stale_cases_and_orphans(store_copy, two_case_catalogue, capsys):
    (store_copy / "mha" / "stray.safetensors").write_bytes(b"not a golden")
    models = sorted(p.relative_to(store_copy).as_posix() for p in golden.stored_models(store_copy))
    golden.regen(root=store_copy, prune=True)
    assert sorted(p for p in files(store_copy) if p.endswith(".safetensors")) == sorted(
        models + [golden.case_path(cases.get_case(n), Path(".")).as_posix() for n in two_case_catalogue])
    assert "delete " in capsys.readouterr().out
    assert golden.verify(store_copy) == []


# ---- all or nothing ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill driver forks one child per kill point")
def test_a_kill_after_any_file_operation_of_regen_leaves_the_old_or_the_new_store(tmp_path):
    """tests/golden_kill_regen.py enumerates every file operation a regen makes on a small store
    (every open for writing, write, fsync, rename, unlink, mkdir), then SIGKILLs a regen right
    after each one in turn; after each kill, `attncheck golden verify` (which recovers first) must
    leave the store byte-identical to the old or the new store and report it as such."""
    result_path = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    r = subprocess.run([sys.executable, "-m", "tests.golden_kill_regen", str(tmp_path), str(result_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(result_path.read_text())
    events, points, old_report = result["events"], result["points"], result["old_report"]
    assert result["new_problems"] == [] and result["old_files"] != result["new_files"]
    # The enumeration covers every kind of write a regen makes: staged files written and flushed,
    # the journal written, flushed and renamed into place (the commit), each new file and the
    # manifest renamed into place, a stale file deleted, the journal deleted.
    for needle in ("write mha/.decode-h8x2-d64-bs16-bf16.safetensors.staged", "fsync .MANIFEST.json.staged",
                   "mkdir mla", "replace mla/.mla-decode-h16-mini-bs16-bf16.safetensors.staged -> mla/",
                   "write ..regen-journal.json.", "-> .regen-journal.json",
                   "replace .MANIFEST.json.staged -> MANIFEST.json",
                   "unlink merge/merge-prefix-posinf-bf16-h4-d64.safetensors", "unlink .regen-journal.json"):
        assert any(needle in e for e in events), (needle, events)
    # The untouched old store, verified with the new catalogue: exactly the catalogue drift.
    assert old_report["rc"] == 1 and "mla-decode-h16-mini-bs16-bf16: in the catalogue but not" in old_report[
        "stderr"] and "merge-prefix-posinf-bf16-h4-d64: in the manifest but not in the catalogue" in old_report["stderr"]
    assert len(points) == len(events)
    for point in points:
        assert point["killed"], point
        assert point["state"] in ("old", "new"), point
        assert point["problems"] == [], point  # the store is sound against its own catalogue
        cli = point["verify_cli"]
        if point["state"] == "new":
            assert cli["rc"] == 0 and "golden OK" in cli["stdout"] and cli["stderr"] == "", point
        else:
            assert (cli["rc"], cli["stderr"]) == (old_report["rc"], old_report["stderr"]), point
    states = [p["state"] for p in points]
    first_new = states.index("new")
    assert "old" in states and states[first_new:] == ["new"] * (len(states) - first_new)
    assert "-> .regen-journal.json" in events[first_new]  # the journal's rename is the commit point
    said = "".join(p["verify_cli"]["stdout"] for p in points)
    assert "discarded" in said and "completed an interrupted regen" in said  # both recoveries ran


def test_pending_journal_blocks_reads_until_recovered(store_copy):
    (store_copy / golden.JOURNAL_NAME).write_text(json.dumps({"renames": [], "deletes": []}))
    with pytest.raises(golden.GoldenError, match="interrupted regen is pending"):
        golden.load(_some_case(), store_copy)
    assert any("interrupted regen is pending" in p for p in golden.verify(store_copy))
    assert golden.recover(store_copy) and golden.verify(store_copy) == []


def test_a_damaged_journal_is_a_one_line_error(store_copy):
    (store_copy / golden.JOURNAL_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(golden.GoldenError, match="is not a regen journal") as e:
        golden.recover(store_copy)
    assert "\n" not in str(e.value)


# ---- verify: every unreadable store is a one-line problem, never an exception --------------------

def _case_file_is_a_directory(root):
    path = golden.case_path(_some_case(), root)
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage,needle", [
    ("a-list", "expected a JSON object"),
    ("cases-a-list", "missing top-level key 'schema_version' (and 3 more)"),
    ("full-manifest-cases-a-list", "'cases' must be an object mapping case name to entry, got a list"),
    ("random-bytes", "got binary data"),
    ("truncated", "is not valid JSON"),
    ("a-directory", "Is a directory"),
    ("wrong-schema", "schema_version 99, expected 1"),
])
def test_verify_reports_an_unreadable_manifest_in_one_line(store_copy, damage, needle):
    MANIFEST_DAMAGE[damage](store_copy / golden.MANIFEST_NAME)
    problems = golden.verify(store_copy)
    assert len(problems) == 1 and needle in problems[0] and "MANIFEST.json" in problems[0], problems


@pytest.mark.parametrize("mutate,needle", [
    (lambda t: t["block_table"].__setitem__((1, 0), 10_000), "block_table: sequence 1 uses block 10000, out of range"),
    (lambda t: t["slot_mapping"].__setitem__(1, int(t["slot_mapping"][0])), "slot_mapping: tokens 0 and 1 both write"),
    (lambda t: t.pop("query"), "do not form a batch (KeyError: 'query')"),
])
def test_verify_reports_a_stored_batch_that_breaks_the_batch_contract(store_copy, mutate, needle):
    name = "mixed-h8x2-d64-bs16-bf16"
    rewrite_case(store_copy, name, mutate)
    problems = golden.verify(store_copy)
    assert len(problems) == 1 and problems[0].startswith(f"case {name}: ") and needle in problems[0], problems


def test_verify_reports_a_case_path_that_is_a_directory(store_copy):
    _case_file_is_a_directory(store_copy)
    problems = golden.verify(store_copy)
    assert problems == [f"case {_some_case().name}: golden file {golden.case_path(_some_case(), store_copy)} "
                        "is a directory, expected a safetensors file"]


@pytest.mark.parametrize("make", ["missing", "a-file"])
def test_verify_reports_a_golden_dir_that_is_not_a_directory(tmp_path, make):
    root = tmp_path / "golden"
    if make == "a-file":
        root.write_text("x")
    problems = golden.verify(root)
    assert len(problems) == 1 and str(root) in problems[0] and "ATTNCHECK_GOLDEN_DIR" in problems[0]
