"""Numerics debugging (DESIGN.md "Beyond the gate").

* ``bundle``    a failing verdict as ONE self-contained safetensors file (no pickle): the
                batch inputs, expected outputs and budgets, the backend's output, LSE and
                caches after the run, and metadata (backend, provider, case spec, versions,
                device, the verdict and its failing rows).
* ``rows``      per-row error maps and the "failing pattern" that replay and minimise compare.
* ``replay``    re-run a bundle on any registered backend (plugins too).
* ``minimize``  shrink a failing case while it keeps failing the same way.
* ``errormap``  PNG error maps (matplotlib); ``html_report`` a self-contained HTML page.
* ``dump``      the dump format for tensors captured from a real run, capture helpers
                (any attncheck backend, vLLM's backend ``forward``), and ``check_dump``.
* ``commands``  the CLI subcommands (``replay``, ``minimize``, ``report``, ``check-dump``) and
                the ``verify --save-failures/--html`` options.

docs/debugging.md is the user's guide.
"""
