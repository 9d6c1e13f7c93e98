"""The version Serve compares to decide whether an update restarts a deployment's replicas.

Serve restarts a deployment's replicas on an update when its code version changes (or its actor resources or
placement); other option changes it applies in place. `serve.run` gives every deployment a random code version
(Ray 2.60, serve/_private/client.py) unless it has one, so every reload of `herd serve` restarted every model:
a 70B TP×PP group reloaded its weights because another model's max_num_seqs changed. herd versions each
deployment by what its replicas are built from instead:

- a model: its ModelSpec (checkpoint, layout, every engine setting, stream pacing, tracing);
- the ingress: what it is bound with (the served models, API keys, limits and other settings) and every model's
  version, because it keeps what a model's replica told it (max_model_len, vocabulary) for its life.

herd's package version is part of each, so an upgraded herd restarts everything. The API keys enter only as a SHA-256 of
them all. (A KubeRay serveConfigV2 is built by Serve's controller, which versions every deployment of the
application by a hash of the whole `args`: there a config change restarts every deployment.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
from typing import Any


@functools.cache
def herd_version() -> str:
    try:
        return importlib.metadata.version("herd")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree that is not installed
        return "unknown"


def _digest(*parts: Any) -> str:
    # json (not repr) so that an object without a stable text form fails here, in the tests, rather than making
    # a version that differs on every call (every reload would restart the deployment again).
    text = json.dumps([herd_version(), *parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_version(spec: Any) -> str:
    return _digest("model", dataclasses.asdict(spec))


def ingress_version(served_models: dict[str, Any], api_keys: list[str], api_keys_file: Any,
                    settings: dict[str, Any], model_versions: dict[str, str]) -> str:
    keys = hashlib.sha256("\n".join(sorted(api_keys)).encode()).hexdigest()
    return _digest("ingress", served_models, keys, api_keys_file, settings, model_versions)
