"""Every shipped checkpoint computes what it computed before the refactors of issue 25.

``tests/data/checkpoint_outputs.json`` holds the fingerprints (``scripts/checkpoint_outputs.py``)
recorded with the code of commit 782b0f5, before the drop-in rewrite and the refactors: the
losses of a small MLP trained by each learned optimizer, the values a black-box proposer
observes, a VSML learner's online logits. The float32 LSTM paths now sum in another order, so
the comparison allows 1e-5 relative (the largest difference seen was 3.3e-6). ``general.pt``
(issue 23) was added later, recorded when it shipped.
"""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("checkpoint_outputs", ROOT / "scripts" / "checkpoint_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_checkpoint_computes_what_was_recorded():
    script = _script()
    recorded = json.loads((ROOT / "tests" / "data" / "checkpoint_outputs.json").read_text())
    actual = script.fingerprints(ROOT / "checkpoints")
    assert script.differences(recorded, actual, rtol=1e-5) == []


def test_the_comparison_catches_a_changed_output():
    script = _script()
    recorded = {"a.pt": [1.0, 2.0], "b.pt": [0.5]}
    assert script.differences(recorded, {"a.pt": [1.0, 2.0 + 1e-3], "b.pt": [0.5]}, 1e-5) == [
        "a.pt: values differ by up to 0.0005 (relative)"]
    assert script.differences(recorded, {"a.pt": [1.0, 2.0]}, 1e-5) == ["b.pt: recorded but missing"]
