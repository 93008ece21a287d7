"""SHA-256 digests of a checkpoint's tensors and spec, written with it and checked on load.

``torch.load`` does not notice bytes that changed inside a tensor (a bad disk, a partial
copy): the file still unpickles and low-mantissa flips give plausible wrong weights. A
checkpoint therefore carries one digest per tensor, keyed by where the tensor sits in the
payload (``"state_dict/module.body.0.weight"``), one of its spec and one of the rest of its
plain data (training record, settings), and every reader compares them before using
anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch

ALGORITHM = "sha256"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 over a tensor's dtype, shape and bytes (hex)."""
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}|{tuple(tensor.shape)}|".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def spec_digest(spec: Any) -> str:
    """SHA-256 over the spec's canonical JSON (sorted keys; hex)."""
    text = json.dumps(spec, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over the payload's plain data in order, each tensor standing as ``"<tensor>"``."""
    text = json.dumps(_without_tensors(payload), default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _without_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "<tensor>"
    if isinstance(value, dict):
        return [[repr(key), _without_tensors(item)] for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        return [_without_tensors(item) for item in value]
    return value


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}/{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{where}/{index}")


def digests(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``digests`` entry for ``payload``: one per tensor, and one of ``payload["spec"]``."""
    content = {k: v for k, v in payload.items() if k != "digests"}
    entry: dict[str, Any] = {
        "algorithm": ALGORITHM,
        "tensors": {where: tensor_digest(t) for where, t in _tensors(content, "")},
    }
    if "spec" in payload:
        entry["spec"] = spec_digest(payload["spec"])
    entry["data"] = data_digest(content)
    return entry


def mismatches(payload: dict[str, Any]) -> list[str]:
    """What in ``payload`` no longer matches its ``digests`` entry (empty when it all does)."""
    written = payload["digests"]
    if not isinstance(written, dict) or written.get("algorithm") != ALGORITHM:
        return ["its digests entry"]
    now = digests(payload)
    found = [
        f"tensor {where!r}"
        for where in sorted(set(now["tensors"]) | set(written.get("tensors", {})))
        if now["tensors"].get(where) != written.get("tensors", {}).get(where)
    ]
    if now.get("spec") != written.get("spec"):
        found.insert(0, "its spec")
    elif now["data"] != written.get("data"):
        found.insert(0, "its settings or training record")
    return found
