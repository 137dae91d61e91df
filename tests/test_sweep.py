"""The sweep tier (attncheck.sweep, docs/sweep.md): configurations drawn from a seed, named
``sweep:S:I``, filtered per backend by capabilities, checked against the live float64 oracle;
the run options around it (time budget, GPU pinning, -n auto) and its report.

The CI sweep itself (TORCH_SDPA and TRITON_ATTN on the CPU) is ``test_ci_sweep_on_the_cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attncheck import backends, cases, cli, harness, options, pytest_plugin, sweep, timing
from impl.backends import triton_attn
from impl.triton import unified_attention as ua
from tests.mutants import mutant

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parent.parent
SMALL, LARGE = sweep.SIZES["small"], sweep.SIZES["large"]


def attncheck(*args, cwd=REPO, timeout=900):
    return subprocess.run([str(Path(sys.executable).parent / "attncheck"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# ---- names and determinism -------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [SMALL, LARGE], ids=lambda s: s.name)
def test_same_seed_same_configurations_and_names_round_trip(sizes):
    first = sweep.configs(11, 40, sizes)
    assert first == sweep.configs(11, 40, sizes)
    assert [c.name for c in first] == [f"sweep:11:{i}" for i in range(40)]
    for c in first:
        assert sweep.case_from_name(c.name, sizes) == c  # one configuration alone, without the others
        assert c.tier == "sweep"
    assert sweep.configs(11, 10, sizes) == first[:10]  # the count does not change what an index means
    other = sweep.configs(12, 40, sizes)
    assert [dataclasses.replace(c, name="x") for c in other] != [dataclasses.replace(c, name="x") for c in first]


def test_configurations_do_not_depend_on_python_hash_seeds():
    code = "from attncheck import sweep; c = sweep.config(5, 7, sweep.SIZES['large']); print(c)"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and "sweep:5:7" in outs.pop()


@pytest.mark.parametrize("text", ["sweep:1", "sweep:a:2", "sweep:1:-2", "sweep:1:2:3", "sweep: 1:2"])
def test_malformed_names_are_refused(text):
    with pytest.raises(ValueError, match="expected sweep:SEED:INDEX"):
        sweep.parse_name(text)


# ---- coverage and bounded specialisations --------------------------------------------------------

def _expected_values(sizes) -> dict:
    """Every value each axis of the generator can take, from its own tables."""
    mha_knobs = {"window": True, "softcap": True, "alibi": True, "sinks": True, "custom_scale": True}
    return {
        "MHA.dtype": set(sweep.MHA_AXES["dtype"]), "MHA.head_size": set(sweep.MHA_AXES["head_size"]),
        "MHA.block_size": set(sweep.MHA_AXES["block_size"]), "MHA.heads": set(sizes.mha_heads),
        "MHA.kv_cache_dtype": {"auto", *sweep.MHA_KNOBS["kv_cache_dtype"][1]}, "MHA.causal": {True, False},
        **{f"MHA.{k}": {True, False} for k in mha_knobs},
        "MHA.family": {"decode", "spec_decode", "extend", "prefill", "mixed", "order"},
        "MLA.family": {"decode", "spec_decode", "extend", "prefill", "mixed", "order"},
        "MLA.dims": set(sweep.MLA_DIMS), "MLA.num_heads": set(sizes.mla_heads),
        "MLA.block_size": set(sweep.MLA_AXES["block_size"]), "MLA.dtype": set(sweep.MLA_AXES["dtype"]),
        "MLA.kv_cache_dtype": {"auto", *sweep.MLA_KNOBS["kv_cache_dtype"][1]}, "MLA.rope_factor": {40.0, None},
        **{f"{k}.{axis}": {True, False} for k in ("MHA", "MLA") for axis in ("chunked", "custom_scale", "long_context")},
        # "some row ..." features of the lengths: that they happen is what matters
        **{f"{k}.{axis}": {True} for k in ("MHA", "MLA")
           for axis in ("partial_last_block", "block_multiple", "boundary_plus_one", "boundary_minus_one")},
        "MHA.fp8_scales": {True, False},
    }


@pytest.mark.parametrize("sizes", [SMALL, LARGE], ids=lambda s: s.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_axis_value_appears_across_a_moderate_sweep(sizes, seed):
    seen = sweep.coverage(sweep.configs(seed, 600, sizes), sizes)
    for axis, values in _expected_values(sizes).items():
        missing = values - set(seen.get(axis, ()))
        assert not missing, f"seed {seed}, {sizes.name}: axis {axis} never takes {missing}"


@pytest.mark.parametrize("sizes", [SMALL, LARGE], ids=lambda s: s.name)
def test_lengths_sit_around_block_and_partition_boundaries_but_not_only_on_them(sizes):
    lens = [s for c in sweep.configs(3, 300, sizes) for s in c.seq_lens]
    on_block = [s for s in lens if s % 16 == 0]
    assert 0.05 < len(on_block) / len(lens) < 0.6
    units = [u for u in sweep.BOUNDARY_UNITS if 4 * u <= sizes.short_context]  # blocks, tiles, partitions
    assert units
    for unit in units:
        near = {s - unit * (s // unit) for s in lens if s > unit}
        assert {0, 1, unit - 1} <= near, f"no lengths next to multiples of {unit}"
    if sizes.name == "large":
        assert max(lens) > 16000, "long contexts reach tens of thousands of keys"


def test_a_sweep_compiles_a_bounded_set_of_kernel_shapes():
    for sizes in (SMALL, LARGE):
        many = sweep.configs(4, 2000, sizes)
        classes = {sweep.class_key(c) for c in many}
        assert len(classes) <= sizes.mha_classes + sizes.mla_classes
        assert len({sweep.class_key(c) for c in many[:4 * sizes.mha_classes]}) == len(classes)  # all early
    assert len({sweep.class_key(c) for c in sweep.configs(4, 400, LARGE, shapes=6)}) <= 6 + 3


def test_batches_keep_vllm_order_unless_they_test_it():
    from impl.batch import BatchError, check_vllm_order, classify_rows

    for c in sweep.configs(9, 400, SMALL):
        kinds = classify_rows(list(c.query_lens), list(c.seq_lens))
        if c.unordered:
            with pytest.raises(BatchError):
                check_vllm_order(kinds)
        else:
            check_vllm_order(kinds)


def test_no_sequence_has_more_than_the_chunk_cap():
    """A drawn chunk size grows so that no sequence's context takes more than
    sweep.MAX_CONTEXT_CHUNKS chunks (the merge chain's bound grows with the count)."""
    chunked = [c for c in sweep.configs(0, 400, sweep.SIZES["large"]) if c.context_chunk_tokens]
    widest = max(-(-(s - q) // c.context_chunk_tokens) for c in chunked for q, s in zip(c.query_lens, c.seq_lens))
    assert widest <= sweep.MAX_CONTEXT_CHUNKS
    assert any(c.context_chunk_tokens in sweep.CHUNK_TOKENS for c in chunked)  # short contexts keep their draw


def test_a_worker_hands_back_cached_gpu_memory_past_the_threshold(monkeypatch):
    """Workers share a GPU: past runtime.SHARED_GPU_CACHE_BYTES a worker's cached memory goes back."""
    from attncheck import runtime

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    for reserved, want in ((runtime.SHARED_GPU_CACHE_BYTES + 1, 1), (runtime.SHARED_GPU_CACHE_BYTES, 0)):
        emptied.clear()
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, r=reserved: r)
        runtime.release_cached_memory("cuda")
        runtime.release_cached_memory("cpu")
        assert len(emptied) == want


# ---- capability filtering --------------------------------------------------------------------------

def test_each_backend_gets_only_the_configurations_its_capabilities_accept():
    rows = sweep.configs(2, 120, SMALL)
    chosen = ["TORCH_SDPA", "TRITON_ATTN", "ROCM_AITER_FA", "TRITON_MLA"]
    pairs, counts = pytest_plugin.sweep_pairs(rows, chosen)
    for case, name in pairs:
        backend = backends.get_backend(name)
        assert backend.kind == case.kind and backend.capabilities.unsupported(case.params()) is None
    for name in chosen:
        c = counts[name]
        kind = backends.get_backend(name).kind
        assert c["configurations_of_its_kind"] == sum(r.kind == kind for r in rows)
        assert c["accepted"] == sum(n == name for _, n in pairs)
        assert c["accepted"] + sum(c["filtered_by_capability"].values()) == c["configurations_of_its_kind"]
    assert "softcap not supported" in counts["TORCH_SDPA"]["filtered_by_capability"]
    assert not any(case.softcap or case.sinks for case, name in pairs if name == "TORCH_SDPA")
    assert not any(case.dtype == "fp32" or not case.causal for case, name in pairs if name == "ROCM_AITER_FA")
    assert counts["TRITON_ATTN"]["accepted"] > counts["TORCH_SDPA"]["accepted"]


# ---- the run: the CLI, one configuration by name, bundles, bad input, the time budget ------------

def _verdicts(path) -> dict:
    return {(v["backend"], v["case"]): v for v in json.loads(Path(path).read_text())["verdicts"]}


def test_ci_sweep_on_the_cpu(tmp_path):
    """CI's sweep: configurations for TORCH_SDPA and TRITON_ATTN (a Triton backend in the
    interpreter), checked against the live float64 oracle. Every pair the capabilities accept
    runs and passes; the JSON says how many each backend ran and where the time went."""
    out = tmp_path / "sweep.json"
    # the stand-in TRITON_ATTN: its capabilities (with TORCH_SDPA's) accept every MHA draw, which
    # line "configurations_run" below relies on (vLLM's kernels, answering as sm_90, take no fp8 e4m3fnuz
    # cache, which seed 1 draws with sinks that TORCH_SDPA lacks: sweep:1:10, 1:24, 1:37)
    r = attncheck("verify", "--device", "cpu", "--tier", "sweep", "--seed", "1", "--count", "50", "--backend",
                  "TORCH_SDPA", "TRITON_ATTN", "--provider", "stand-in", "-n", "0", "--json", str(out), "--profile")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    rep = data["sweep"]
    assert rep["configurations_drawn"] == 50 and rep["failures"] == 0
    for name in ("TORCH_SDPA", "TRITON_ATTN"):
        c = rep["per_backend"][name]
        assert c["ran"] == c["accepted"] == c["pass"] + c["xfail"] > 0
    assert {v["status"] for v in data["verdicts"]} <= {"pass", "xfail"}  # filtered pairs are not run as skips
    assert rep["configurations_run"] == sum(sweep.kind_of_index(i) == "MHA" for i in range(50))
    assert data["timing"]["checks"] == len(data["verdicts"]) and data["timing"]["phases"]["oracle"] > 0
    assert "sweep seed 1" in r.stdout and "where the time went" in r.stdout


@pytest.fixture
def planted_sweep_failure(tmp_path):
    """A sweep configuration that the DROP_LAST_KEY plugin backend fails (the smallest of seed 2:
    not the default seed, so that the report must name the seed of the case given)."""
    rows = [c for c in sweep.configs(2, 40, SMALL) if c.kind == "MHA" and not c.unordered
            and backends.get_backend("TORCH_SDPA").capabilities.unsupported(c.params()) is None]
    return min(rows, key=lambda c: sum(c.seq_lens))


def test_one_configuration_reruns_by_name_and_its_failure_prints_the_full_spec(tmp_path, planted_sweep_failure):
    case = planted_sweep_failure
    out, bundles = tmp_path / "v.json", tmp_path / "bundles"
    r = attncheck("verify", "--device", "cpu", "--case", case.name, "--backend-plugin",
                  "tests.plugins.drop_last_key:BACKEND", "--backend", "DROP_LAST_KEY", "TORCH_SDPA", "-n", "0",
                  "--json", str(out), "--save-failures", str(bundles))
    assert r.returncode == 1, r.stdout + r.stderr
    verdicts = _verdicts(out)
    assert set(verdicts) == {("DROP_LAST_KEY", case.name), ("TORCH_SDPA", case.name)}  # that one, nothing else
    assert verdicts[("TORCH_SDPA", case.name)]["status"] == "pass"
    assert verdicts[("DROP_LAST_KEY", case.name)]["status"] == "fail"
    assert f"case {case.name}: MHA seq_lens={case.seq_lens}" in r.stdout  # the full spec, printed
    assert f"seed={case.seed}" in r.stdout
    assert "sweep seed 2 " in r.stdout  # the report describes the named case's seed
    from attncheck.debug import bundle

    b = bundle.read(next(bundles.glob("DROP_LAST_KEY*.safetensors")))
    assert b.case == case  # the bundle rebuilds the same configuration
    again = harness.run_backend(backends.get_backend("TORCH_SDPA"), b.case, "cpu", tensors=b.tensors)
    assert again.status == "pass"


@pytest.mark.parametrize("args, says", [
    (("--case", "sweep:1:x"), "expected sweep:SEED:INDEX"),
    (("--tier", "smoke", "--case", "sweep:1:2"), "run it with the sweep tier"),
    (("--tier", "sweep", "--case", "prefill-h8x2-d64-bs16-bf16"), "not catalogue cases"),
    (("--tier", "smoke", "--count", "5"), "only for the sweep tier"),
])
def test_bad_sweep_options_are_one_line_errors(capsys, args, says):
    assert cli.main(["verify", "--device", "cpu", *args]) == 2  # refused before anything runs
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and not captured.out, captured


@pytest.mark.parametrize("args, says", [(("--count", "-1"), "--count"), (("--max-seconds", "0"), "--max-seconds"),
                                        (("-n", "many"), "--workers"), (("--shapes", "0"), "--shapes")])
def test_bad_numbers_are_argument_errors(capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["verify", "--device", "cpu", "--tier", "sweep", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_time_budget_stops_cleanly_and_says_what_ran(tmp_path, workers):
    """In this process, and under xdist (each worker reads the run's absolute deadline)."""
    out = tmp_path / "v.json"
    r = attncheck("verify", "--device", "cpu", "--tier", "sweep", "--count", "400", "--backend", "TORCH_SDPA",
                  "--max-seconds", "1", "-n", workers, "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())["sweep"]
    assert rep["time_budget_reached"] and 1 <= rep["configurations_run"] < 300
    assert rep["per_backend"]["TORCH_SDPA"]["ran"] < rep["per_backend"]["TORCH_SDPA"]["accepted"]
    assert "time budget 1 s reached" in r.stdout


def test_each_shape_class_runs_on_one_worker(tmp_path):
    """Under xdist a shape class is one group: its kernel specialisations are compiled by one
    worker, not by every worker that meets the class (sweep.worker_group)."""
    out = tmp_path / "v.json"
    r = attncheck("verify", "--device", "cpu", "--tier", "sweep", "--count", "14", "--shapes", "2", "--backend",
                  "TORCH_SDPA", "TRITON_ATTN", "--provider", "stand-in", "-n", "2", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    workers_of_class, configs_of_class = {}, {}
    for v in json.loads(out.read_text())["verdicts"]:
        key = sweep.class_key(sweep.case_from_name(v["case"], SMALL, shapes=2))
        workers_of_class.setdefault(key, set()).add(v["timings"]["worker"])
        configs_of_class.setdefault(key, set()).add(v["case"])
    assert len(set().union(*workers_of_class.values())) == 2, "both workers ran checks"
    assert max(len(c) for c in configs_of_class.values()) >= 3, "classes with several configurations"
    assert all(len(w) == 1 for w in workers_of_class.values()), workers_of_class


def test_a_free_worker_takes_an_unstarted_class_then_one_it_has_compiled():
    queue = ["A#0", "A#1", "B#0", "B#1", "C#0"]
    assert pytest_plugin.next_group(queue, started=set(), mine=set()) == "A#0"
    assert pytest_plugin.next_group(queue[1:], started={"A"}, mine=set()) == "B#0"  # every class first
    assert pytest_plugin.next_group(["A#1", "B#1"], started={"A", "B", "C"}, mine={"B"}) == "B#1"  # then its own
    assert pytest_plugin.next_group(["A#1", "B#1"], started={"A", "B"}, mine={"C"}) == "A#1"
    assert pytest_plugin.next_group(["case-x", "case-y"], started={"case-x"}, mine=set()) == "case-y"
    many = [sweep.worker_group(c) for c in sweep.configs(1, 2 * sweep.GROUP_SPAN, SMALL)]
    assert len({pytest_plugin.group_class(g) for g in many}) == SMALL.mha_classes + SMALL.mla_classes
    assert len(set(many)) == 2 * len({pytest_plugin.group_class(g) for g in many})  # two blocks per class


def test_a_cases_backends_run_on_one_worker(tmp_path):
    """Outside the sweep the group is the case (a live case's oracle is built once per case)."""
    out = tmp_path / "v.json"
    names = ["decode-h8x2-d64-bs16-bf16", "decode-h8x2-d128-bs16-fp16-window7", "extend-h8x2-d64-bs16-bf16-chunks1",
             "extend-h8x2-d64-bs16-bf16-chunks2"]
    r = attncheck("verify", "--device", "cpu", "--case", *names, "--backend", "TORCH_SDPA", "TRITON_ATTN",
                  "--provider", "stand-in", "-n", "2", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    workers = {}
    for v in json.loads(out.read_text())["verdicts"]:
        workers.setdefault(v["case"], []).append(v["timings"]["worker"])
    assert sorted(workers) == sorted(names) and all(len(w) == 2 for w in workers.values())
    assert all(len(set(w)) == 1 for w in workers.values()), workers


# ---- all GPUs: pinning and -n auto ------------------------------------------------------------------

@pytest.mark.parametrize("visible, worker, expect", [("0,1", "gw0", "0"), ("0,1", "gw3", "1"), ("4,5,6", "gw4", "5"),
                                                     ("GPU-a,GPU-b", "gw1", "GPU-b"), ("7", "gw2", "7")])
def test_each_worker_is_pinned_to_one_visible_gpu(monkeypatch, visible, worker, expect):
    """gwN -> visible GPU N mod count, also when the run already restricts CUDA_VISIBLE_DEVICES."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.delenv("ATTNCHECK_PINNED_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    config = type("Config", (), {"option": type("Opt", (), {"attncheck_device": "cuda"})()})()
    pytest_plugin._pin_worker_gpu(config)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expect and os.environ["ATTNCHECK_PINNED_GPU"] == expect


def test_n_auto_on_cuda_means_gpus_times_workers_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    opt = type("Opt", (), {"attncheck_device": "cuda", "attncheck_workers_per_gpu": 3})()
    config = type("Config", (), {"option": opt})()
    assert pytest_plugin.pytest_xdist_auto_num_workers(config) == 6
    opt.attncheck_workers_per_gpu = None
    assert pytest_plugin.pytest_xdist_auto_num_workers(config) == 2 * options.default_workers_per_gpu(2)
    opt.attncheck_device = "cpu"
    assert pytest_plugin.pytest_xdist_auto_num_workers(config) is None  # xdist's own CPU count


# ---- timing -------------------------------------------------------------------------------------------

def test_compilations_are_counted_through_tritons_hooks():
    """Under the interpreter nothing compiles, so call the hooks the way Triton's JIT does."""
    import triton

    assert timing.install_compile_hooks()
    knobs = triton.knobs.runtime
    with timing.compiling() as w:
        knobs.jit_cache_hook(key=("k", 1), repr="_unified_kernel[num_warps=4](...)", fn=None, compile={},
                             is_manual_warmup=False, already_compiled=False)
        knobs.jit_post_compile_hook(key=("k", 1), repr="_unified_kernel[num_warps=4](...)", fn=None, compile={},
                                    is_manual_warmup=False, already_compiled=False)
    assert w.compiles == 1 and w.seconds >= 0 and w.kernels[0].startswith("_unified_kernel:")
    with timing.compiling() as nothing:
        pass
    assert nothing.compiles == 0


def test_the_time_outside_checks_is_split_per_worker():
    """Start-up, gaps and the tail of each worker, from the checks' start times and durations
    (two workers over a 10-s run; a third ran nothing): they add up to the time outside checks."""
    def check(worker, started, seconds):
        return harness.Verdict(backend="B", case="c", status="pass", seconds=seconds,
                               timings={"worker": worker, "started": 100.0 + started, "backend": 0.0})
    verdicts = [check("gw0", 2.0, 1.0), check("gw0", 4.0, 3.0), check("gw1", 5.0, 4.0)]
    s = timing.summary(verdicts, wall_seconds=10.0, workers=3, started=100.0)
    o = s["outside"]
    assert (o["start_up"], o["start_up_max"]) == (2.0 + 5.0, 5.0)
    assert o["between_checks"] == 1.0  # gw0 idle from 3 s to 4 s
    assert o["after_last_check"] == (10.0 - 7.0) + (10.0 - 9.0)
    assert o["idle_workers"] == 10.0
    parts = o["start_up"] + o["between_checks"] + o["after_last_check"] + o["idle_workers"]
    assert parts == pytest.approx(s["outside_checks_seconds"])
    assert "between checks 1.0 s" in timing.render(s)


def test_a_real_run_reports_where_its_outside_time_went(tmp_path):
    """Under xdist every verdict carries its start, and the JSON's split of the time outside
    checks accounts for all of it (up to the controller's start-up and report, which no worker sees)."""
    out = tmp_path / "v.json"
    r = attncheck("verify", "--device", "cpu", "--tier", "sweep", "--count", "6", "--backend", "TORCH_SDPA",
                  "-n", "2", "--json", str(out), "--profile")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    t = data["timing"]
    assert all("started" in v["timings"] for v in data["verdicts"])
    o = t["outside"]
    assert o["start_up"] > 0 and o["after_last_check"] >= 0 and o["between_checks"] >= 0
    parts = o["start_up"] + o["between_checks"] + o["after_last_check"] + o["idle_workers"]
    assert parts == pytest.approx(t["outside_checks_seconds"], abs=0.05 * t["wall_seconds"])
    assert "outside checks: start-up" in r.stdout


# ---- a planted bug the stored tiers miss and the sweep catches ---------------------------------------

WINDOW_IGNORED_WITH_ALIBI = [("            if USE_WINDOW:\n                vis = vis & ((qpos",
                              "            if USE_WINDOW and not USE_ALIBI:\n                vis = vis & ((qpos", 1)]


def _alibi_window_seed() -> int:
    """The first seed whose shape classes combine ALiBi with a window shorter than the contexts."""
    return next(s for s in range(200) if any(c.alibi and c.causal and c.sliding_window
                                             and c.sliding_window < SMALL.short_context // 2
                                             for c in sweep.mha_classes(s, SMALL)))


def test_a_window_dropped_under_alibi_passes_every_stored_case_and_fails_the_sweep(monkeypatch, tmp_path):
    """TRITON_ATTN with a kernel that skips the sliding-window mask when ALiBi is on (the
    class of vLLM's "ALiBi prefill ignores the window"). The mutation changes the kernel only
    when both constexprs are set; no stored case sets both, so every stored tier passes it
    (shown here on the stored cases next to it: windowed or ALiBi ones). The sweep draws the
    combination and fails it, and the unmodified kernel passes what the sweep failed."""
    stored = [c for c in cases.all_cases() if c.kind == "MHA"]
    assert not [c.name for c in stored if c.alibi and c.sliding_window], "a stored case now covers the combination"
    bad = mutant(ua, WINDOW_IGNORED_WITH_ALIBI, tmp_path)
    monkeypatch.setattr(triton_attn, "unified_attention", bad)
    backend = triton_attn.TritonAttnBackend(provider="stand-in")  # the mutant is in the stand-in kernel
    for c in stored:
        if c.tier == "smoke" and (c.alibi or c.sliding_window):
            v = harness.run_backend(backend, c, "cpu")
            assert v.status == "pass", f"the mutant should pass stored {c.name}: {v.reason}"

    seed = _alibi_window_seed()
    failed = None
    for index in range(4 * SMALL.mha_classes):  # the sweep in its order, up to its first failure
        c = sweep.config(seed, index, SMALL)
        if sweep.accepted(backend, c) is None:
            v = harness.run_backend(backend, c, "cpu")
            assert v.status in ("pass", "fail"), v.report
            if v.status == "fail":
                failed = c
                break
    assert failed is not None, f"the sweep of seed {seed} did not catch the dropped window"
    assert failed.alibi and failed.sliding_window, f"{failed.name} failed without the combination: {failed}"
    monkeypatch.undo()
    clean = harness.run_backend(triton_attn.TritonAttnBackend(provider="stand-in"), failed, "cpu")
    assert clean.status == "pass", clean.report
