"""vLLM kernel provider: vLLM's own Triton attention kernels, loaded at run time.

Modules: ``loader`` (find vLLM's code, import its kernels without ``import vllm``, named
patches), ``kernels`` (adapters: validated calls of vLLM's kernels in this project's batch
terms), ``extract`` (write the ~40 source files the kernels need into a folder for a machine
without network), ``bench_rows`` (rows for ``attncheck bench``).

Providers. A backend name (TRITON_ATTN, ROCM_ATTN, TRITON_MLA) is vLLM's; the code behind it
comes from a provider: vLLM's kernels (``vllm==<version>``) where they load, else this
project's own Triton kernels (``attncheck-stand-in``). The preference comes from
``ATTNCHECK_PROVIDER``: ``auto`` (default: vLLM where loadable), ``vllm`` or ``stand-in``.
``provider_error(preference)`` says up front whether a preference can be honoured here.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

PROVIDER_ENV = "ATTNCHECK_PROVIDER"
PREFERENCES = ("auto", "vllm", "stand-in")
STAND_IN = "attncheck-stand-in"


def preference_from_env(env: Optional[Mapping[str, str]] = None) -> str:
    """The provider preference in ``ATTNCHECK_PROVIDER`` (default ``auto``); ValueError naming
    the variable for any other value."""
    env = os.environ if env is None else env
    value = env.get(PROVIDER_ENV, "").strip().lower() or "auto"
    if value not in PREFERENCES:
        raise ValueError(f"{PROVIDER_ENV}: expected one of {', '.join(PREFERENCES)}, "
                         f"got {env.get(PROVIDER_ENV)!r}")
    return value


def _check(preference: str) -> str:
    if preference not in PREFERENCES:
        raise ValueError(f"preference: expected one of {', '.join(PREFERENCES)}, got {preference!r}")
    return preference


def provider_error(preference: str) -> Optional[str]:
    """None if ``preference`` can be honoured in this process, else a one-line reason.

    ``auto`` and ``stand-in`` always can (auto falls back to the stand-ins); ``vllm`` needs
    vLLM's kernels to load here (a source, and a GPU or ``TRITON_INTERPRET=1``), which this
    loads once for the process.
    """
    if _check(preference) != "vllm":
        return None
    from impl.vllm import loader

    try:
        loader.load()
    except loader.VllmUnavailable as e:
        return f"vLLM's kernels cannot run here: {e}"
    return None


class ProviderChoice:
    """Which implementation a backend runs, resolved once on first use.

    ``preference`` None reads ``ATTNCHECK_PROVIDER``. ``uses_vllm``: run vLLM's kernels;
    ``provider``: the string verdicts carry; ``note``: why the stand-ins run under ``auto``;
    ``error``: why an explicit ``vllm`` preference cannot be honoured (the backend is then
    unavailable, with that reason).
    """

    def __init__(self, preference: Optional[str] = None):
        self.preference = _check(preference) if preference is not None else preference_from_env()
        self._resolved = None

    def _resolve(self):
        if self._resolved is None:
            if self.preference == "stand-in":
                self._resolved = (False, STAND_IN, f"{PROVIDER_ENV}=stand-in", None)
            else:
                from impl.vllm import loader

                try:
                    state = loader.load()
                    self._resolved = (True, state.provider, state.describe(), None)
                except loader.VllmUnavailable as e:
                    if self.preference == "vllm":
                        self._resolved = (False, "vllm (unavailable)", str(e), f"vLLM's kernels cannot run here: {e}")
                    else:
                        self._resolved = (False, STAND_IN, f"vLLM not loadable: {e}", None)
        return self._resolved

    @property
    def uses_vllm(self) -> bool:
        return self._resolve()[0]

    @property
    def provider(self) -> str:
        return self._resolve()[1]

    @property
    def note(self) -> str:
        return self._resolve()[2]

    @property
    def error(self) -> Optional[str]:
        return self._resolve()[3]

    def gate(self, base):
        """The backend's availability ``base``, refused with ``error`` where an explicit ``vllm``
        preference cannot be honoured."""
        from impl.backend import Availability

        return Availability.no(self.error) if base.ok and self.error else base
