"""The lm-eval adapter, offline: `lm_eval.simple_evaluate(model="attncheck", ...)` on local JSONL
tasks (generate_until and loglikelihood) with the stored addition model."""

from __future__ import annotations

import json
import random
import shutil
from types import SimpleNamespace

import pytest

from attncheck.spot import addition

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter test needs the extra: pip install -e '.[lmeval]'")
pytest.importorskip("tokenizers", reason="the lm-eval adapter needs tokenizers: pip install -e '.[lmeval]'")

N = 8


@pytest.fixture(scope="module")
def problems():
    rng = random.Random("lmeval-test")
    return [addition.problem(rng) for _ in range(N)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, problems):
    d = tmp_path_factory.mktemp("lmeval")
    rows = [{"question": q, "answer": a.strip(), "wrong": f"{int(a) + 10:04d}"} for q, a in problems]
    data = d / "addition.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "\n{{question}}", "metadata": {"version": 1.0}}
    tasks = {
        "attncheck_addition_gen": {**common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
                                   "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 6},
                                   "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                    "higher_is_better": True}]},
        "attncheck_addition_mc": {**common, "output_type": "multiple_choice", "doc_to_choice": "{{[answer, wrong]}}",
                                  "doc_to_target": 0, "target_delimiter": "",
                                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name, cfg in tasks.items():
        (d / f"{name}.yaml").write_text(json.dumps({"task": name, **cfg}))  # JSON is YAML
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "addition"
    shutil.copytree(addition.MODEL_DIR, d)
    return d


def test_simple_evaluate_offline(monkeypatch, task_dir, checkpoint, problems):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import attncheck.spot.lmeval  # noqa: F401  registers "attncheck"
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="attncheck", model_args=f"pretrained={checkpoint},backend=TRITON_ATTN,device=cpu",
        tasks=["attncheck_addition_gen", "attncheck_addition_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True)
    gen = out["results"]["attncheck_addition_gen"]
    mc = out["results"]["attncheck_addition_mc"]
    # what the model answers through the adapter is what it answers in `attncheck spot`
    answers = [s["resps"][0][0] for s in out["samples"]["attncheck_addition_gen"]]
    truth = {q: a.strip() for q, a in problems}
    got = {s["doc"]["question"]: r for s, r in zip(out["samples"]["attncheck_addition_gen"], answers)}
    assert all("\n" not in r for r in answers), "generations must be cut at `until`"
    assert gen["exact_match,none"] == sum(got[q] == truth[q] for q in truth) / N
    assert gen["exact_match,none"] >= 0.75 and mc["acc,none"] >= 0.75, (gen, mc)
    assert "Stderr" in lm_eval.utils.make_table(out)


def test_generate_until_cuts_and_loglikelihood_prefers_the_answer(checkpoint):
    from attncheck.spot.lmeval import AttncheckLM

    lm = AttncheckLM(pretrained=str(checkpoint), backend="TORCH_SDPA", device="cpu")
    req = SimpleNamespace(args=("\n123+456=", {"until": ["9"], "max_gen_toks": 6}))
    assert lm.generate_until([req]) == ["057"]  # 0579\n, cut before the first "9"
    (right, right_greedy), (wrong, _) = lm.loglikelihood([SimpleNamespace(args=("\n123+456=", "0579")),
                                                          SimpleNamespace(args=("\n123+456=", "0589"))])
    assert right_greedy and right > wrong
