"""Exported checkpoints: what users load, as opposed to Lightning's ``.ckpt`` for resuming.

A checkpoint is a plain dict saved with ``torch.save``::

    {"format": "learnopt-checkpoint", "format_version": 1,
     "kind": "learned_optimizer", "class": "CoordinatewiseLSTM",
     "config": {...constructor kwargs...}, "state_dict": {...tensors...},
     "metadata": {...meta-training config, meta-steps, task family, evaluation...},
     "digest": "sha256:...",  # of the weights (names, dtypes, shapes, bytes)
     "learnopt_version": "0.1.0"}

It is read with ``torch.load(weights_only=True)`` and the class is looked up in a fixed
registry by name, so loading never runs code from the file. Before anything is built, every
zip member's CRC and the weights' digest are checked (altered bytes are refused; files
written before the digest existed carry none and are checked by CRC alone), and the config is
validated: numbers finite, sizes positive, and the class built on the ``meta`` device (no
memory) must have exactly the file's weight shapes, so a small file cannot ask for gigabytes.
Every failure raises ``CheckpointError`` (or ``FileNotFoundError``) naming the file and what
is wrong. The digest guards against damage, not against an attacker, who can recompute it:
checkpoints are untrusted data, which is why loading never runs code from them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from learnopt.atomic_file import write_atomically
from learnopt.learned.base import LearnedOptimizer

FORMAT = "learnopt-checkpoint"
FORMAT_VERSION = 1

# kind -> the package whose REGISTRY ({class name -> class}) lists the classes a file of that
# kind may name. The package is imported when a file of its kind is loaded or exported, so
# loading a learned optimizer never imports the black-box stack (scipy) or the VSML learners.
KIND_PACKAGES: dict[str, str] = {
    "learned_optimizer": "learnopt.learned",
    "blackbox_proposer": "learnopt.blackbox",
    "vsml_learner": "learnopt.vsml",
}


def registry(kind: str) -> dict[str, type[nn.Module]]:
    """The classes a checkpoint of ``kind`` may name (``KeyError`` for an unknown kind).

    Args:
        kind: a checkpoint kind (``KIND_PACKAGES``).
    Returns:
        ``{class name: class}``.
    Raises:
        KeyError: an unknown kind.
    """
    return importlib.import_module(KIND_PACKAGES[kind]).REGISTRY


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


# Config keys that are sizes wherever they appear: integers from 1 to MAX_SIZE (or lists of
# them; an empty list of hidden sizes means no hidden layer).
SIZE_KEYS = frozenset({"hidden_size", "num_layers", "dim", "num_queries", "state_size", "message_size",
                       "micro_ticks", "input_copies", "ensemble", "num_features", "num_classes"})
SIZE_LIST_KEYS = frozenset({"hidden_sizes"})
# Larger than any architecture the registries hold; the meta-device build checks exact shapes.
MAX_SIZE = 2**20
# Config floats that divide (log_and_sign divides by p) and must be positive.
POSITIVE_KEYS = frozenset({"preprocess_p"})
# Non-persistent buffers a constructor may allocate beyond the file's weights.
MAX_EXTRA_BYTES = 2**28


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """``"sha256:<hex>"`` of the weights: each name, dtype, shape and raw bytes, in name order.

    Args:
        state_dict: ``{name: tensor}``.
    Returns:
        The digest string.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _plain(value: Any) -> Any:
    """Metadata as JSON-like data (what ``weights_only`` loading accepts)."""
    return json.loads(json.dumps(value, default=str))


def export_checkpoint(obj: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``obj`` (a registered learned object with ``config()``) to ``path`` atomically:
    the file is written beside the target and renamed, so an interrupted export never leaves
    a truncated checkpoint where a good one was.

    Args:
        obj: the learned optimizer, proposer or VSML learner.
        path: the file to write.
        metadata: JSON-like metadata (meta-training config, evaluation, ...).
    Returns:
        ``path`` as a ``Path``.
    Raises:
        CheckpointError: ``obj``'s class is not registered for its kind.
        OSError: the file cannot be written (``path`` is left as it was).
    """
    from learnopt import __version__

    kind = getattr(obj, "kind", None)
    name = type(obj).__name__
    if kind not in KIND_PACKAGES or registry(kind).get(name) is not type(obj):
        raise CheckpointError(f"cannot export {name}: not a registered {kind or 'learnopt'} class")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "class": name,
        "config": _plain(obj.config()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in obj.state_dict().items()},
        "metadata": _plain(metadata or {}),
        "learnopt_version": __version__,
    }
    return _atomic_save(payload, Path(path))


def _atomic_save(payload: dict[str, Any], path: Path) -> Path:
    """``torch.save(payload)`` to a temp file beside ``path``, flushed to disk, then renamed
    over ``path``. A failure (a full disk) removes the temp file, leaves ``path`` as it was
    and raises ``OSError`` naming ``path``."""
    payload = {**payload, "digest": weights_digest(payload["state_dict"])}
    return write_atomically(path, lambda f: torch.save(payload, f), "learnopt checkpoint")


def update_metadata(path: str | os.PathLike, **fields: Any) -> Path:
    """Add or replace metadata fields of an existing checkpoint (e.g. its evaluation summary),
    rewriting it atomically; weights and config are untouched.

    Args:
        path: the checkpoint.
        **fields: metadata fields to add or replace.
    Returns:
        ``path`` as a ``Path``.
    Raises:
        CheckpointError: the file is not a valid, intact learnopt checkpoint (the message says why).
        FileNotFoundError: there is no file at ``path``.
    """
    payload = read_checkpoint(path)
    payload["metadata"] = {**payload["metadata"], **_plain(fields)}
    return _atomic_save(payload, Path(path))


def update_config(path: str | os.PathLike, note: str, **fields: Any) -> Path:
    """Change constructor options of an existing checkpoint that leave its weights as they are,
    such as a meta-test setting (``ensemble`` of a VSML learner), rewriting it atomically. The
    new config must build the class with exactly the saved weights' names and shapes; each
    change is recorded, with ``note`` (why), in the metadata's ``config_changes``.

    Args:
        path: the checkpoint.
        note: why the config changes (required).
        **fields: constructor options to change.
    Returns:
        ``path`` as a ``Path``.
    Raises:
        ValueError: an empty ``note``.
        CheckpointError: the file is not a valid, intact learnopt checkpoint (the message says why).
        FileNotFoundError: there is no file at ``path``.
    """
    if not note:
        raise ValueError("update_config: say why the config changes (note)")
    path = Path(path)
    payload = read_checkpoint(path)
    changed = {**payload, "config": {**payload["config"], **_plain(fields)}}
    try:
        obj = _build(changed, path)  # the weights, as saved, must fit the new config exactly
    except CheckpointError as e:
        raise CheckpointError(f"learnopt checkpoint {path}: {fields} does not fit {payload['class']} "
                              f"or would change the weights' names or shapes: {e}") from e
    changes = payload["metadata"].get("config_changes", [])
    change = _plain({"fields": fields, "note": note})
    payload["metadata"] = {**payload["metadata"], "config_changes": [*changes, change]}
    payload["config"] = _plain(obj.config())
    return _atomic_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's dict without building anything.

    Args:
        path: the checkpoint.
    Returns:
        The checkpoint's dict (module docstring), on the CPU.
    Raises:
        CheckpointError: the file is not a valid, intact learnopt checkpoint (the message says why).
        FileNotFoundError: there is no file at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"learnopt checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"learnopt checkpoint {path}: is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (random bytes, a truncated file, a bare
        # pickle) would otherwise reach the weights_only unpickler and be misreported as refused.
        raise CheckpointError(
            f"learnopt checkpoint {path}: corrupt or not a torch file (not a zip archive as written by "
            "torch.save; the file may be truncated)"
        )
    _check_zip_members(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message starts with advice to retry with weights_only=False; the line that
        # says what was found (e.g. "unsupported GLOBAL posix.system") is the useful one.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise CheckpointError(
            f"learnopt checkpoint {path}: refused, it holds objects other than tensors and plain data "
            f"(checkpoints are loaded with weights_only=True and never run code): {detail}"
        ) from e
    except Exception as e:  # truncated zip, random bytes, ...
        raise CheckpointError(
            f"learnopt checkpoint {path}: corrupt or not a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"learnopt checkpoint {path}: not a learnopt checkpoint (format {what!r})")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"learnopt checkpoint {path}: format version {version!r} is not supported "
            f"(this learnopt reads versions 1..{FORMAT_VERSION}; upgrade learnopt for newer files)"
        )
    for key, kind in (("kind", str), ("class", str), ("config", dict), ("state_dict", dict), ("metadata", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"learnopt checkpoint {path}: field {key!r} is missing or not a {kind.__name__}")
    _check_digest(payload, path)
    _validate_config(payload["config"], path)
    return payload


def _check_zip_members(path: Path) -> None:
    """Every member of the archive read back against its CRC-32 (torch's reader checks none,
    so altered bytes in a weight would otherwise load)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"learnopt checkpoint {path}: corrupt zip archive ({type(e).__name__}: {e}); "
                              "the file may be truncated or damaged") from e
    if bad is not None:
        raise CheckpointError(f"learnopt checkpoint {path}: corrupt, member {bad!r} fails its CRC check "
                              "(altered or damaged bytes)")


def _check_digest(payload: dict[str, Any], path: Path) -> None:
    if "digest" not in payload:
        return  # written before checkpoints carried a digest: the members' CRCs were checked
    digest = payload["digest"]
    state = payload["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"learnopt checkpoint {path}: field 'state_dict' must map names to tensors")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise CheckpointError(f"learnopt checkpoint {path}: field 'digest' is {digest!r}, not 'sha256:<hex>'")
    if weights_digest(state) != digest:
        raise CheckpointError(f"learnopt checkpoint {path}: the weights do not match the recorded digest "
                              "(altered or damaged bytes); refusing to load them")


def _validate_config(config: dict[str, Any], path: Path, where: str = "config") -> None:
    """Numbers finite, sizes within [1, MAX_SIZE], dividing constants positive; the error names
    the key. Runs before any class is built."""
    for key, value in config.items():
        name = f"{where}.{key}"
        if isinstance(value, dict):
            _validate_config(value, path, name)
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise CheckpointError(f"learnopt checkpoint {path}: {name} is {v}, not a finite number")
        if key in SIZE_KEYS or key in SIZE_LIST_KEYS:
            if key in SIZE_LIST_KEYS and not isinstance(value, list):
                raise CheckpointError(f"learnopt checkpoint {path}: {name} is {value!r}, not a list of sizes")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE:
                    raise CheckpointError(f"learnopt checkpoint {path}: {name} is {value!r}, not a size "
                                          f"(integers from 1 to {MAX_SIZE})")
        if key in POSITIVE_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise CheckpointError(f"learnopt checkpoint {path}: {name} is {value!r}, it must be a positive number")


def _build(payload: dict[str, Any], path: Path) -> nn.Module:
    """The object a validated checkpoint payload describes, with its weights loaded; a config
    or weights that do not fit the class raise ``CheckpointError`` naming the problem."""
    kind, name = payload["kind"], payload["class"]
    if kind not in KIND_PACKAGES:
        raise CheckpointError(f"learnopt checkpoint {path}: unknown kind {kind!r} (known: {sorted(KIND_PACKAGES)})")
    cls = registry(kind).get(name)
    if cls is None:
        raise CheckpointError(
            f"learnopt checkpoint {path}: unknown {kind} class {name!r} (known: {sorted(registry(kind))})"
        )
    state = payload["state_dict"]
    _shapes_on_meta(cls, payload["config"], state, path)  # refuses before anything is allocated
    try:
        obj = cls(**payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"learnopt checkpoint {path}: config does not fit {name}: {e}") from e
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"learnopt checkpoint {path}: weight {k!r} contains NaN or inf")
    obj.load_state_dict(state)
    return obj


def _shapes_on_meta(cls: type[nn.Module], config: dict[str, Any], state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The state dict (shapes only) that ``cls(**config)`` would have, built on the ``meta``
    device so nothing is allocated; the real build follows only if the file's weights and a
    bounded amount of other buffers are all it allocates."""
    name = cls.__name__
    try:
        with torch.device("meta"):
            probe = cls(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"learnopt checkpoint {path}: config does not fit {name}: {e}") from e
    expected = probe.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"learnopt checkpoint {path}: weights do not match {name}{config}: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for k, v in state.items():
        if not isinstance(v, Tensor) or v.shape != expected[k].shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise CheckpointError(
                f"learnopt checkpoint {path}: weight {k!r} has shape {got}, {name}{config} expects "
                f"{tuple(expected[k].shape)}"
            )
    extra = sum(b.numel() * b.element_size() for n, b in probe.named_buffers() if n not in expected)
    if extra > MAX_EXTRA_BYTES:
        raise CheckpointError(f"learnopt checkpoint {path}: config {config} would allocate {extra} bytes "
                              "beyond its weights")
    return expected


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild whatever the checkpoint holds (a learned optimizer, ...), in eval mode.
    ``obj.checkpoint_metadata`` holds the file's metadata.

    Args:
        path: the checkpoint.
        map_location: the device to move the object to.
    Returns:
        The rebuilt ``nn.Module``.
    Raises:
        CheckpointError: the file is not a valid, intact learnopt checkpoint (the message says why).
        FileNotFoundError: there is no file at ``path``.
    """
    payload = read_checkpoint(path)
    obj = _build(payload, Path(path))
    obj.checkpoint_metadata = payload["metadata"]
    return obj.to(map_location).eval()


def load_optimizer(path: str | os.PathLike,
                   params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
                   **options: Any) -> torch.optim.Optimizer:
    """Load a learned-optimizer checkpoint as a drop-in ``torch.optim.Optimizer`` over ``params``
    (tensors, ``named_parameters()`` or param group dicts, whose ``lr`` multiplies the learned
    update: 1.0 as meta-trained, 0 freezes the group). The learned optimizer is moved to the
    device of the first parameter.

    Args:
        path: a learned-optimizer checkpoint.
        params: tensors, ``named_parameters()`` or param group dicts.
        **options: keyword options of the optimizer's ``as_torch_optimizer`` (e.g. ``check_finite``
            of ``TransformOptimizer``; ``batch_dims`` for ``FeatureMLPOptimizer``).
    Returns:
        A ``torch.optim.Optimizer`` (a ``TransformOptimizer``).
    Raises:
        CheckpointError: the file is not a valid checkpoint or holds no learned optimizer.
        FileNotFoundError: there is no file at ``path``.
    """
    # groups' params may be generators: read them once, here, and hand the lists on
    params = [{**item, "params": _as_list(item["params"])} if isinstance(item, dict) and "params" in item else item
              for item in params]
    obj = load(path)
    if not isinstance(obj, LearnedOptimizer):
        raise CheckpointError(f"learnopt checkpoint {path}: holds a {payload_kind(obj)}, not a learned optimizer")
    first = _first_tensor(params)
    if first is not None:
        obj = obj.to(first.device)
    return obj.as_torch_optimizer(params, **options)


def _as_list(params: Any) -> list[Any]:
    return [params] if isinstance(params, Tensor) else list(params)


def _first_tensor(params: list[Any]) -> Tensor | None:
    for item in params:
        for p in (item.get("params", []) if isinstance(item, dict) else [item]):
            p = p[1] if isinstance(p, tuple) else p
            if isinstance(p, Tensor):
                return p
    return None


def payload_kind(obj: nn.Module) -> str:
    """What ``obj`` is, for messages.

    Args:
        obj: a loaded object.
    Returns:
        ``"<kind> (<class>)"``.
    """
    return f"{getattr(obj, 'kind', 'object')} ({type(obj).__name__})"
