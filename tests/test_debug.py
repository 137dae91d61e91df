"""Numerics debugging (issue 12): repro bundles, replay, the minimiser, HTML error maps, dumps.

Every check is made against a planted bug (tests/planted.py) and its correct twin, so each
test can fail: a bundle that loses a tensor, a replay that judges other rows, a minimiser that
shrinks into another bug or a passing case, a dump that mis-pages its cache.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attncheck import cli, golden, harness
from attncheck.cases import get_case
from attncheck.debug import bundle, dump, errormap, html_report, minimize, replay, rows
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.batch import AttentionBatch
from tests.planted import PlantedBackend

pytestmark = pytest.mark.smoke
REPO = Path(__file__).resolve().parent.parent
MIXED = "mixed-h8x2-d64-bs16-bf16"  # 6 sequences (decodes, extends, prefills), 8x2 heads
DECODE = "decode-h8x2-d64-bs16-bf16"  # 4 decodes: the per-sequence x KV-block map applies
FP8 = "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn"


def _bundle(directory, bug, case_name):
    backend = PlantedBackend(bug)
    v = harness.run_backend(backend, case_name, keep_artifacts=True)
    assert v.status in ("fail", "error"), v.report
    return bundle.save_verdict(directory, v, backend, get_case(case_name), "cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return {"mixed": _bundle(d, "drop_last_key", MIXED), "decode": _bundle(d, "drop_last_key", DECODE),
            "fp8": _bundle(d, "skip_cache_write", FP8), "dir": d}


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- 1. bundles -----------------------------------------------------------------------------------

def test_bundle_is_self_contained_safetensors(store):
    from safetensors import safe_open
    with safe_open(str(store["mixed"]), framework="pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["attncheck"])
    case = get_case(MIXED)
    golden_names = set(golden.load(case))
    assert golden_names <= names  # inputs (caches before the run), expected.*, budget.*
    assert {"actual.output", "actual.lse", "actual.key_cache", "actual.value_cache"} <= names
    assert meta["backend"] == "PLANTED_DROP_LAST_KEY" and meta["case"]["kind"] == "MHA"
    assert meta["case"]["params"]["seq_lens"] == list(case.seq_lens)
    assert {"torch", "python", "safetensors", "triton"} <= set(meta["versions"]) and meta["device"].startswith("cpu")
    assert meta["verdict"]["status"] == "fail" and meta["verdict"]["failing_rows"]
    b = bundle.read(store["mixed"])
    assert b.case == case
    for name, t in golden.load(case).items():  # the inputs are the golden's, byte for byte
        assert golden.tensor_sha(b.tensors[name]) == golden.tensor_sha(t), name


def test_fp8_caches_travel_as_bytes_with_their_dtype(store):
    from safetensors import safe_open
    with safe_open(str(store["fp8"]), framework="pt") as f:
        assert f.get_tensor("key_cache").dtype == torch.uint8
        assert json.loads(f.metadata()["attncheck"])["dtypes"]["actual.key_cache"] == "float8_e4m3fn"
    b = bundle.read(store["fp8"])
    assert b.tensors["key_cache"].dtype == torch.float8_e4m3fn
    assert b.actual["key_cache"].dtype == torch.float8_e4m3fn
    assert torch.equal(b.tensors["key_cache"].view(torch.uint8), golden.load(get_case(FP8))["key_cache"].view(torch.uint8))


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    v = harness.run_backend(PlantedBackend("drop_last_key"), DECODE, keep_artifacts=True)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        bundle.save_verdict(tmp_path, v, PlantedBackend("drop_last_key"), get_case(DECODE), "cpu")
    assert list(tmp_path.iterdir()) == []


def test_verify_workers_write_bundles_and_the_html_report(tmp_path):
    """`attncheck verify` (pytest-xdist workers on the CPU) writes the failing verdicts' bundles
    from its workers and, after the run, the HTML report with their error maps."""
    out, html = tmp_path / "bundles", tmp_path / "html"
    r = subprocess.run([sys.executable, "-m", "attncheck", "verify", "--device", "cpu", "-n", "2",
                        "--backend-plugin", "tests.plugins.drop_last_key:make_backends",
                        "--backend", "PLUGIN_CORRECT", "PLUGIN_SCALE",
                        "--case", "decode-h8x2-d64-bs16-bf16", "prefill-h8x2-d64-bs16-bf16",
                        "--save-failures", str(out), "--html", str(html)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "repro bundles: 2 written" in r.stdout and "HTML report:" in r.stdout, r.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == ["PLUGIN_SCALE__decode-h8x2-d64-bs16-bf16.safetensors",
                       "PLUGIN_SCALE__prefill-h8x2-d64-bs16-bf16.safetensors"]
    assert not list(out.glob(".*"))  # no temp file left by the atomic write
    assert bundle.read(out / written[0]).verdict["status"] == "fail"
    page = (html / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "PLUGIN_CORRECT" in page


def test_verify_rejects_a_file_as_output_folder(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    rc, _, err = _main(capsys, "verify", "--device", "cpu", "--backend", "TORCH_SDPA", "--save-failures", str(f))
    assert rc == 2 and "--save-failures" in err and "is a file" in err


# ---- 2. replay ---------------------------------------------------------------------------------------

def test_replay_fails_the_same_rows_and_the_fixed_backend_passes(store):
    b = bundle.read(store["mixed"])
    recorded = set(replay.recorded_maps(b).failing_rows())
    again = replay.replay(b, PlantedBackend("drop_last_key"))
    assert again.status == "fail"
    assert set(replay.maps_of(b.case, b.tensors, again).failing_rows()) == recorded
    assert replay.compare_rows(b, again)[0]
    # rows of the sequences' last query tokens only: the drop-last-key signature
    facts = rows.token_facts(b.case, b.tensors)
    assert {facts[t]["position"] == facts[t]["seq_len"] - 1 for t, _ in recorded} == {True}
    fixed = replay.replay(b, PlantedBackend(None))
    assert fixed.status == "pass", fixed.report
    assert not replay.compare_rows(b, fixed)[0]
    other = replay.replay(b, PlantedBackend("wrong_gqa_group"))
    assert other.status == "fail" and not replay.compare_rows(b, other)[0]


def test_replay_cli_exit_codes_and_plugins(store, capsys):
    rc, out, _ = _main(capsys, "replay", str(store["mixed"]), "--backend-plugin", "tests.plugins.drop_last_key:BACKEND",
                       "--backend", "DROP_LAST_KEY", "--device", "cpu")
    assert rc == 1 and "FAIL" in out and "rows: same as the bundle" in out
    rc, out, _ = _main(capsys, "replay", str(store["mixed"]), "--backend-plugin",
                       "tests.plugins.drop_last_key:make_backends", "--backend", "PLUGIN_CORRECT", "--device", "cpu")
    assert rc == 0 and "PASS" in out and "passes now" in out
    rc, _, err = _main(capsys, "replay", str(store["mixed"]), "--device", "cpu")  # its backend is not registered
    assert rc == 2 and "--backend-plugin" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["replay", "no/such.safetensors"], "no such file"),
    (["replay", "README.md"], "not a readable safetensors file"),
    (["minimize", "README.md", "--max-steps", "0"], "--max-steps"),
    (["report"], "verify JSON"),
    (["report", "--json", "README.md"], "not JSON"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    rc, _, err = _main(capsys, *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_bundle_is_not_a_dump_and_the_reverse(store, tmp_path, capsys):
    rc, _, err = _main(capsys, "check-dump", str(store["mixed"]))
    assert rc == 2 and "use `attncheck replay`" in err
    cap = dump.CapturingBackend(PlantedBackend(None), tmp_path)
    harness.run_backend(cap, DECODE)
    rc, _, err = _main(capsys, "replay", str(cap.paths[0]))
    assert rc == 2 and "use `attncheck check-dump`" in err


# ---- 3. minimise ---------------------------------------------------------------------------------------

def test_minimize_shrinks_a_planted_bug_keeping_its_pattern(store, tmp_path):
    b = bundle.read(store["mixed"])
    backend = PlantedBackend("drop_last_key")
    first = minimize.minimize(b, backend, max_steps=200)
    c = first.state.case
    assert len(c.seq_lens) <= 2 and sum(c.seq_lens) <= 64, first.summary()
    assert first.original.traits == {"last_query"}, first.original.describe()
    assert first.pattern.same_as(first.original)[0] and not first.stopped_early
    assert first.summary().startswith("fails with 1 sequence") and "last query row" in first.summary()
    out = tmp_path / "min.safetensors"
    minimize.write_result(first, out, b, backend, "cpu")
    small = bundle.read(out)
    again = replay.replay(small, backend)
    assert again.status == "fail" and replay.compare_rows(small, again)[0]
    assert replay.replay(small, PlantedBackend(None)).status == "pass"  # the reference there is sound
    assert small.meta["minimized"]["summary"] == first.summary()
    second = minimize.minimize(b, backend, max_steps=200)  # deterministic
    assert second.accepted == first.accepted and second.summary() == first.summary()
    assert {k: golden.tensor_sha(t) for k, t in second.tensors.items()} == \
        {k: golden.tensor_sha(t) for k, t in first.tensors.items()}


def test_minimize_keeps_the_gqa_group_of_a_head_mapping_bug(store):
    result = minimize.minimize(bundle.read(store["mixed"]), PlantedBackend("wrong_gqa_group"), max_steps=200)
    c = result.state.case
    # head 0 reading the last KV head needs two KV heads; the group size (4) is kept
    assert (c.num_kv_heads, c.num_heads) == (2, 8), result.summary()
    assert {"head0_in_group", "first_kv_group"} <= result.original.traits


def test_minimize_a_triton_kernel_bug_down_to_its_single_key_block(tmp_path, monkeypatch):
    """TRITON_ATTN whose decode skips the last partial KV block (tests/backends/
    test_triton_attn_planted.py bug (a)): the minimiser keeps block 16 (the backend's capability)
    and ends at one sequence of 17 keys, the smallest with a single-key last block."""
    from impl.backends.triton_attn import TritonAttnBackend
    from impl.triton import unified_attention as ua
    real = ua.unified_attention

    def skip_last_partial_block(*args, **kw):
        sl, bs = kw["seq_lens"], args[1].shape[1]
        q_len = kw["query_start_loc"][1:] - kw["query_start_loc"][:-1]
        return real(*args, **{**kw, "seq_lens": torch.where((q_len == 1) & (sl > bs) & (sl % bs != 0), sl - sl % bs, sl)})
    monkeypatch.setattr(ua, "unified_attention", skip_last_partial_block)
    backend = TritonAttnBackend(provider="stand-in")  # the bug is planted in the stand-in kernel
    v = harness.run_backend(backend, DECODE, keep_artifacts=True)
    path = bundle.save_verdict(tmp_path, v, backend, get_case(DECODE), "cpu")
    result = minimize.minimize(bundle.read(path), backend, max_steps=60)
    c = result.state.case
    assert (c.seq_lens, c.query_lens, c.num_kv_heads, c.block_size) == ((17,), (1,), 1, 16), result.summary()
    assert result.original.traits == {"single_key_block"} and "single-key last block" in result.summary()


def test_minimize_stops_at_its_step_budget_and_says_so(store):
    result = minimize.minimize(bundle.read(store["mixed"]), PlantedBackend("drop_last_key"), max_steps=3)
    assert result.runs == 3 and "--max-steps" in result.stopped_early and "stopped early" in result.summary()


class RaisesOnLongQueries(PlantedBackend):
    """Correct, except that it raises for a sequence with more than 4 query tokens."""

    def run(self, batch):
        if max(batch.query_lens()) > 4:
            raise RuntimeError("tile overflow: q_len > 4")
        return super().run(batch)


def test_an_erroring_verdict_is_bundled_replayed_and_minimised(tmp_path):
    backend = RaisesOnLongQueries(None, name="RAISES")
    v = harness.run_backend(backend, MIXED, keep_artifacts=True)
    assert v.status == "error"
    b = bundle.read(bundle.save_verdict(tmp_path, v, backend, get_case(MIXED), "cpu"))
    assert b.actual == {} and "tile overflow" in b.verdict["reason"]
    assert replay.replay(b, backend).status == "error"
    result = minimize.minimize(b, backend, max_steps=200)
    assert result.pattern.checks == {"error:RuntimeError"}
    assert result.state.case.query_lens == (5,), result.summary()


def test_pattern_rejects_other_checks_and_lost_traits():
    original = rows.Pattern(frozenset({"output", "lse"}), frozenset({"last_query"}), frozenset({"last_query"}), 4)
    assert rows.Pattern(frozenset({"output", "lse"}), frozenset(), frozenset({"last_query", "decode"}), 1).same_as(original)[0]
    assert not rows.Pattern(frozenset({"output", "lse", "finite"}), shared=frozenset({"last_query"})).same_as(original)[0]
    assert not rows.Pattern(frozenset({"output", "lse"}), shared=frozenset({"inner_query"})).same_as(original)[0]
    assert not rows.Pattern(frozenset()).same_as(original)[0]


class PlantedMLA:
    """Float32 absorbed MLA (a legitimate implementation) with an optional dropped last key."""

    kind = "MLA"
    capabilities = Capabilities(block_sizes=BlockSizes(multiple_of=1), returns_lse=True)

    def __init__(self, drop_last_key):
        self.drop = drop_last_key
        self.name = "PLANTED_MLA" + ("_DROP_LAST_KEY" if drop_last_key else "")

    def availability(self, device):
        return Availability.yes()

    def run(self, batch):
        flat = batch.kv_cache.view(-1, batch.kv_cache.shape[-1])
        flat[batch.slot_mapping] = torch.cat([batch.kv_c, batch.k_pe], -1).to(flat.dtype)
        L, bs = batch.kv_lora_rank, batch.block_size
        qsl = batch.query_start_loc.tolist()
        out = torch.empty(batch.q_nope.shape[0], batch.num_heads, batch.w_uv.shape[2], dtype=batch.dtype)
        lse = torch.empty(batch.num_heads, batch.q_nope.shape[0])
        for b, s in enumerate(batch.seq_lens.tolist()):
            pos = torch.arange(s)
            lat = flat[batch.block_table[b, pos // bs].long() * bs + pos % bs].float()
            q_lat = torch.einsum("qnp,lnp->qnl", batch.q_nope[qsl[b]:qsl[b + 1]].float(), batch.w_uk.float())
            sc = (q_lat @ lat[:, :L].T + batch.q_pe[qsl[b]:qsl[b + 1]].float() @ lat[:, L:].T) * batch.scale
            q_len = qsl[b + 1] - qsl[b]
            visible = pos[None, :] <= torch.arange(s - q_len, s)[:, None]
            if self.drop:
                visible &= pos[None, :] < s - 1
            sc = sc.masked_fill(~visible[:, None, :], float("-inf"))
            p = torch.softmax(sc, -1)
            out[qsl[b]:qsl[b + 1]] = torch.einsum("qnl,lnv->qnv", p @ lat[:, :L], batch.w_uv.float()).to(batch.dtype)
            lse[:, qsl[b]:qsl[b + 1]] = torch.logsumexp(sc, -1).T
        return BackendOutput(out, lse)


def test_minimize_an_mla_case(tmp_path):
    case = "mla-mixed-h8-mini-bs64-bf16"
    assert harness.run_backend(PlantedMLA(False), case).status == "pass"
    v = harness.run_backend(PlantedMLA(True), case, keep_artifacts=True)
    path = bundle.save_verdict(tmp_path, v, PlantedMLA(True), get_case(case), "cpu")
    result = minimize.minimize(bundle.read(path), PlantedMLA(True), max_steps=200)
    c = result.state.case
    assert len(c.seq_lens) <= 2 and sum(c.seq_lens) <= 64 and c.num_heads < 8, result.summary()
    assert result.pattern.same_as(result.original)[0]


# ---- 4. error maps and the HTML page ----------------------------------------------------------------------

def test_error_maps_point_at_the_dropped_block(store):
    b = bundle.read(store["decode"])
    maps = replay.recorded_maps(b)
    align = errormap.block_alignment(b.case, b.tensors, b.actual, maps)
    # sequence 3 has 113 keys: its last block holds one key, the one the bug drops
    assert float(align[3, 7]) > 0.99 and float(align[3, :7].abs().max()) < 0.5
    figs = errormap.maps_pngs(b.case, b.tensors, b.actual, maps, "t")
    assert [c for c, _ in figs] == ["error / budget per query token x head", "per sequence x KV block"]
    assert all(png.startswith(b"\x89PNG") for _, png in figs)


def test_html_report_is_self_contained(store, tmp_path, capsys):
    rc, out, _ = _main(capsys, "report", str(store["decode"]), str(store["fp8"]), "--out", str(tmp_path / "r.html"))
    assert rc == 0 and "report written" in out
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # decode: 2 maps, fp8: 1
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "PLANTED_DROP_LAST_KEY" in page and "sequence 0, token 0 of 1 (row 0), head 4" in page  # localized rows
    assert "attncheck replay" in page


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="needs Debian's chromium for the headless screenshot (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(store, tmp_path):
    page = html_report.write(tmp_path / "r.html", html_report.verdicts_from_bundles([store["decode"]]))
    shot = tmp_path / "shot.png"
    r = subprocess.run(["bash", str(REPO / "scripts" / "html_screenshot.sh"), str(page), str(shot), "1200", "1400"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from matplotlib.image import imread
    img = imread(str(shot))[..., :3]
    assert img.shape[:2] == (1400, 1200)
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.35) & (img[..., 2] < 0.35)  # over-budget cells of the map
    assert int(red.sum()) > 500 and float(img.std()) > 0.1


# ---- 5. dumps --------------------------------------------------------------------------------------

def test_a_dump_from_triton_attn_checks_green(tmp_path, capsys):
    cap = dump.CapturingBackend(__import__("attncheck.backends").backends.get_backend("TRITON_ATTN"), tmp_path)
    assert harness.run_backend(cap, DECODE).status == "pass"
    rc, out, _ = _main(capsys, "check-dump", str(cap.paths[0]), "--device", "cpu")
    assert rc == 0 and "PASS" in out, out


def test_a_dump_from_a_planted_bug_is_localized_like_verify(tmp_path, capsys):
    backend = PlantedBackend("wrong_page")
    cap = dump.CapturingBackend(backend, tmp_path)
    direct = harness.run_backend(cap, MIXED, keep_artifacts=True)
    verdict, tensors, d = dump.check_dump(cap.paths[0])
    assert direct.status == verdict.status == "fail"
    assert verdict.worst_ratio == direct.worst_ratio
    assert (set(replay.maps_of(d.case, tensors, verdict).failing_rows())
            == set(replay.maps_of(get_case(MIXED), harness.golden_tensors(MIXED), direct).failing_rows()))
    assert {r["where"].split(",")[0] for r in verdict.failing_rows} == {"sequence 0"}
    rc, out, _ = _main(capsys, "check-dump", str(cap.paths[0]), "--bundle", str(tmp_path / "b.safetensors"))
    assert rc == 1 and "sequence 0, token" in out
    b = bundle.read(tmp_path / "b.safetensors")  # a dump becomes a bundle: replay it on the fixed backend
    assert replay.replay(b, PlantedBackend(None)).status == "pass"


def test_dump_caches_hold_only_the_blocks_the_batch_reads(tmp_path):
    cap = dump.CapturingBackend(PlantedBackend(None), tmp_path)
    harness.run_backend(cap, "decode-h5x1-d64-bs16-bf16-long4099")
    tensors, meta = bundle.read_raw(cap.paths[0])
    assert tensors["key_cache"].shape[0] == -(-4099 // 16) + -(-333 // 16) + 1  # used blocks + 1 poison block
    assert meta["format"] == "attncheck-dump" and meta["knobs"]["scale"] == 64 ** -0.5
    assert dump.check_dump(cap.paths[0])[0].status == "pass"


class FakeVllmImpl:
    """The surface of a vLLM v1 attention impl that capture_vllm_forward reads: forward(layer,
    query, key, value, kv_cache, attn_metadata, output) over a [2, num_blocks, bs, Hkv, D] cache,
    vLLM's (W-1, 0) window tuple and 0-means-off softcap; runs a planted backend inside."""

    def __init__(self, backend, scale, window):
        self.backend, self.scale, self.kv_cache_dtype = backend, scale, "auto"
        self.sliding_window = (-1, -1) if window is None else (window - 1, 0)
        self.logits_soft_cap, self.alibi_slopes, self.sinks = 0, None, None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None):
        T = attn_metadata.num_actual_tokens
        kc, vc = kv_cache.unbind(0)
        window = None if self.sliding_window[0] < 0 else self.sliding_window[0] + 1
        batch = AttentionBatch(query=query[:T], key=key[:T], value=value[:T], key_cache=kc, value_cache=vc,
                               block_table=attn_metadata.block_table, query_start_loc=attn_metadata.query_start_loc,
                               seq_lens=attn_metadata.seq_lens, slot_mapping=attn_metadata.slot_mapping[:T],
                               scale=self.scale, sliding_window=window)
        output[:T] = self.backend.run(batch).output.reshape(T, -1)
        return output


@pytest.mark.parametrize("bug, status", [(None, "pass"), ("drop_last_key", "fail")])
def test_capture_vllm_forward(tmp_path, bug, status):
    case = get_case("decode-h8x2-d128-bs16-fp16-window7")
    t = golden.load(case)
    pad = 3  # CUDA-graph padding rows past num_actual_tokens, slot -1
    T = t["query"].shape[0]
    q, k, v = (torch.cat([t[n], torch.zeros(pad, *t[n].shape[1:], dtype=t[n].dtype)]) for n in ("query", "key", "value"))
    meta = SimpleNamespace(num_actual_tokens=T, block_table=t["block_table"], query_start_loc=t["query_start_loc"],
                           seq_lens=t["seq_lens"], slot_mapping=torch.cat([t["slot_mapping"], torch.full((pad,), -1)]))
    kv_cache = torch.stack([t["key_cache"], t["value_cache"]])
    impl = dump.capture_vllm_forward(FakeVllmImpl(PlantedBackend(bug), case.softmax_scale, case.sliding_window), tmp_path)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    out = torch.zeros(T + pad, case.num_heads * case.head_size, dtype=q.dtype)
    impl.forward(layer, q, k, v, kv_cache, meta, output=out)
    impl.forward(layer, q, k, v, kv_cache, meta, output=out)  # max_calls=1: the second call is not dumped
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["FakeVllmImpl-call0.safetensors"]
    verdict, _, d = dump.check_dump(files[0])
    assert d.case.sliding_window == 7 and d.case.num_tokens == T
    assert verdict.status == status, verdict.report


def test_split_vllm_kv_cache_layouts():
    x = torch.arange(2 * 3 * 4 * 2 * 8.0).reshape(3, 2, 4, 2, 8)
    k, v = dump._split_vllm_kv_cache(x)
    assert torch.equal(k, x[:, 0]) and torch.equal(v, x[:, 1])
    k, v = dump._split_vllm_kv_cache(x.transpose(0, 1))
    assert torch.equal(k, x[:, 0])
    with pytest.raises(dump.DumpError, match="5-D NHD"):
        dump._split_vllm_kv_cache(x[0])
