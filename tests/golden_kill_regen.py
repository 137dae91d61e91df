"""Driver for the kill-injection test of `golden regen` (tests/test_golden_integrity.py).

    python -m tests.golden_kill_regen WORKDIR RESULT_JSON

Builds a small store (catalogue v1: four cases) under WORKDIR/store, then regenerates it with
catalogue v2 (two cases' outputs changed, one unchanged, one removed, one new; --prune). First
it runs that regen to the end once, recording every file operation it makes on the store; then,
for each operation k in turn, it restores the v1 store, forks, and SIGKILLs the child right after
operation k. After each kill it runs `attncheck golden verify` (the CLI's own entry point, in
this process so that the test catalogue applies; it recovers first, then verifies), records its
exit code and output, and whether the store is then exactly the v1 store, exactly the v2 store,
or neither.

Why a small temp store: every kill point costs a fork, a regen and a verify; over the whole
committed store (hundreds of files, each written in several operations) that is far too slow
for CI. Four cases exercise every kind of file operation a regen makes (a changed file, an
unchanged one, a new file in a new folder, a pruned one, the manifest, the journal), and every
one of those operations is a kill point.

Goldens come from the committed store (loaded, not recomputed) so that this stays fast; the
store under test is selected with ATTNCHECK_GOLDEN_DIR, as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from attncheck import cases, cli, golden

COMMITTED = golden.golden_dir()
V1 = ["decode-h8x2-d64-bs16-bf16", "mixed-h5x1-d80-bs16-bf16", "extend-h8x2-d64-bs16-bf16-fp8e4m3fn-chunks3",
      "merge-prefix-posinf-bf16-h4-d64"]
V2 = V1[:3] + ["mla-decode-h16-mini-bs16-bf16"]  # the merge case is dropped, an MLA case (new folder) added
CHANGED_IN_V2 = set(V1[:2])

# os functions that change the file system (or write to an open file): the kill points.
_MUTATORS = ("open", "write", "fsync", "replace", "rename", "unlink", "remove", "mkdir", "rmdir", "chmod",
             "truncate", "ftruncate", "link", "symlink")


def use_catalogue(version: str) -> None:
    names = V1 if version == "v1" else V2
    golden.stored_cases = lambda: [cases.get_case(n) for n in names]

    def generate(case):
        tensors = golden.load(case, COMMITTED)
        if version == "v2" and case.name in CHANGED_IN_V2:
            tensors["expected.output"] = tensors["expected.output"] + 0.25
        return tensors

    golden.generate = generate


def snapshot(root: Path) -> dict:
    """Every file of the store with its sha256 (the lock file is not store content)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def record_file_operations(root: Path, kill_after=None) -> list:
    """Wrap the os mutators: log each operation on the store; SIGKILL after operation `kill_after`."""
    events: list = []
    store_fds: dict = {}  # fd -> path, for write/fsync
    root_s = str(root)

    def on_store(name, args, result):
        if name in ("write", "fsync", "ftruncate"):
            return args[0] in store_fds
        if name == "open":
            flags = args[1] if len(args) > 1 else 0
            if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                return False
        return any(str(a).startswith(root_s) for a in args[:2] if isinstance(a, (str, os.PathLike)))

    def wrap(name, real):
        def op(*args, **kwargs):
            result = real(*args, **kwargs)
            if name == "open" and str(args[0]).startswith(root_s):
                store_fds[result] = args[0]
            if on_store(name, args, result):
                paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))] or [store_fds[args[0]]]
                events.append(f"{name} {' -> '.join(os.path.relpath(a, root_s) for a in paths)}")
                if kill_after is not None and len(events) == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        return op

    for name in _MUTATORS:
        if hasattr(os, name):
            setattr(os, name, wrap(name, getattr(os, name)))
    return events


def golden_verify_cli() -> dict:
    """`attncheck golden verify` as a user runs it: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["golden", "verify"])
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def regen_in_child(store: Path, kill_after, events_path: Path) -> int:
    """Run the v2 regen in a forked child; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            use_catalogue("v2")
            events = record_file_operations(store, kill_after)
            golden.regen(out=io.StringIO(), prune=True)
            events_path.write_text(json.dumps(events))
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def main(workdir: Path, result_path: Path) -> None:
    store = workdir / "store"
    os.environ["ATTNCHECK_GOLDEN_DIR"] = str(store)
    os.environ.pop("PYTEST_XDIST_WORKER", None)  # regen refuses xdist workers; this is a plain process
    use_catalogue("v1")
    golden.regen(out=io.StringIO())
    assert golden.verify() == [], golden.verify()
    old = snapshot(store)
    pristine = workdir / "pristine"
    shutil.copytree(store, pristine)
    use_catalogue("v2")  # what verify says about the untouched v1 store once the code is at v2
    old_report = golden_verify_cli()

    events_path = workdir / "events.json"
    status = regen_in_child(store, None, events_path)
    assert status == 0 and events_path.exists(), f"the uninterrupted regen failed (wait status {status})"
    events = json.loads(events_path.read_text())
    use_catalogue("v2")
    new = snapshot(store)
    new_problems = golden.verify()

    points = []
    for k in range(1, len(events) + 1):
        shutil.rmtree(store)
        shutil.copytree(pristine, store)
        status = regen_in_child(store, k, events_path)
        use_catalogue("v2")  # the interrupted regen's catalogue: the code the user runs verify with
        report = golden_verify_cli()
        state = {json.dumps(old): "old", json.dumps(new): "new"}.get(json.dumps(snapshot(store)), "neither")
        use_catalogue("v1" if state == "old" else "v2")
        points.append({"after": events[k - 1], "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9,
                       "verify_cli": report, "state": state, "problems": golden.verify()})
    result_path.write_text(json.dumps({"events": events, "new_problems": new_problems, "points": points,
                                       "old_report": old_report,
                                       "old_files": sorted(old), "new_files": sorted(new)}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
