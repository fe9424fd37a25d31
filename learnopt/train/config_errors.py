"""Readable messages for configs that jsonargparse refuses.

jsonargparse reports a value that fits none of a Union's types with one "Expected a <type>"
line per type and the real cause buried among them, and a class refused as a protocol
implementation with no word on which method differs (it compares annotations). ``explain``
keeps the cause, and for a protocol names the method and the signature it must have.
"""

from __future__ import annotations

import importlib
import inspect
import re

_NOISE = re.compile(r"^\s*-\s*Expected a <")
_PROTOCOL = re.compile(r"Import path does not implement protocol (\w+)")


def explain(message: str) -> str:
    """A short message for a jsonargparse error ``message`` (unchanged if it is not one of the
    forms above).

    Args:
        message: the error message.

    Returns:
        The key, what could not be built and the causes; for a protocol, the method that differs.
    """
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"Given value: (.*)", message)
    causes = []
    for line in message.splitlines():
        stripped = line.strip()
        if stripped.startswith("- ") and not _NOISE.match(line) and "Does not validate" not in stripped:
            causes.append(stripped[2:])
    value = given.group(1).strip() if given else "the value"
    class_path = re.search(r"class_path='([^']+)'", value)
    what = class_path.group(1) if class_path else value
    where = f"{key.group(1)}: " if key else ""
    protocols = [m.group(1) for c in causes for m in [_PROTOCOL.search(c)] if m]
    if protocols and not class_path:
        return where + _protocol_mismatch(value, protocols)
    return f"{where}{what} could not be built: " + "; ".join(dict.fromkeys(causes) or ["no subtype accepted it"])


def _protocol_mismatch(import_path: str, protocols: list[str]) -> str:
    """Which method of ``import_path`` keeps it from matching the protocols (learnopt's
    ``TaskFamily`` / ``EpisodeFamily``), with the signature jsonargparse compares."""
    from learnopt.meta.episodic import EpisodeFamily
    from learnopt.task import TaskFamily

    known = {"TaskFamily": TaskFamily, "EpisodeFamily": EpisodeFamily}
    try:
        module, _, name = import_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        return f"{import_path} cannot be imported ({e})"
    problems = []
    for proto_name in protocols:
        proto = known.get(proto_name)
        if proto is None:
            continue
        for member in _members(proto):
            expected = inspect.signature(getattr(proto, member))
            if not hasattr(cls, member):
                problems.append(f"for {proto_name} it needs a method {member}{expected}")
                continue
            got = inspect.signature(getattr(cls, member))
            if str(got) != str(expected):
                problems.append(f"for {proto_name}, its {member}{got} must read {member}{expected} "
                                "(the same parameters and type annotations: jsonargparse compares them)")
    detail = "; ".join(problems) or "it matches none of " + ", ".join(protocols)
    return f"{import_path} is not accepted as a task family: {detail}"


def _members(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
