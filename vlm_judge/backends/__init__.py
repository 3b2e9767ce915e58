"""Backends, chosen by name from a lazy registry so optional dependencies load only when used."""

from __future__ import annotations

import importlib
from typing import Any

from vlm_judge.backends.base import Backend, Generation, GenerationParams, Prompt, ScoresTokens

# name -> "module:factory"; the module is imported only when the backend is asked for.
_REGISTRY: dict[str, str] = {
    "mock": "vlm_judge.backends.mock:MockBackend",
    "hf": "vlm_judge.backends.hf:HFBackend",
    "openai": "vlm_judge.backends.openai:OpenAIBackend",
    "vllm": "vlm_judge.backends.vllm:VLLMBackend",
}

# pip extra that provides each backend's dependencies, for the install hint
_EXTRAS = {"hf": "hf", "vllm": "vllm", "openai": None, "mock": None}


def register_backend(name: str, target: str) -> None:
    """Register a backend factory as 'package.module:callable' under `name`."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(backend_name: str, /, **kwargs: Any) -> Backend:
    """Build the backend registered as `name`, with a pip hint if its dependencies are missing."""
    name = backend_name
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {available_backends()}")
    module_name, attr = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        extra = _EXTRAS.get(name)
        hint = f" (pip install 'vlm-judge[{extra}]')" if extra else ""
        raise ImportError(f"backend {name!r} needs a package that is not installed: {e}{hint}") from e
    return getattr(module, attr)(**kwargs)


__all__ = [
    "Backend",
    "Generation",
    "GenerationParams",
    "Prompt",
    "ScoresTokens",
    "available_backends",
    "get_backend",
    "register_backend",
]
