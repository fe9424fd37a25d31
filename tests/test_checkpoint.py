"""Tests of ``learnopt.checkpoint``: export, load, load_optimizer, and every way a file can be bad.

References: the module that was exported (its weights, config, and the steps its own
``as_torch_optimizer`` takes); an uninterrupted optimizer run for state round trips; for bad
files, the exact reason each one is bad, and for the malicious pickle a flag file that plain
unpickling demonstrably creates.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn

import learnopt
from learnopt.checkpoint import read_checkpoint, weights_digest
from learnopt.learned import CoordinatewiseLSTM

DT = torch.float64
KW = dict(hidden_size=5, num_layers=2, preprocess="log_sign", preprocess_p=5.0, output_scale=0.05)
META = {"meta_steps": 123, "task": {"family": "quadratic10_uniform", "dims": [10, 10]}, "lr": 0.001, "note": "x"}


def _module(seed=0, **kw) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(**(kw or KW))


@pytest.fixture
def exported(tmp_path):
    m = _module()
    path = learnopt.export_checkpoint(m, tmp_path / "sub" / "lopt.pt", META)
    return m, path


def _payload(path):
    return torch.load(path, weights_only=True)


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


def _train(model, opt, steps):
    X, Y = _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- round trip


def test_round_trip_weights_config_metadata(exported):
    m, path = exported
    assert path.exists() and path.name == "lopt.pt"
    loaded = learnopt.load(path)
    assert type(loaded) is CoordinatewiseLSTM
    assert loaded.config() == m.config() == KW
    sd, ref = loaded.state_dict(), m.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    assert loaded.checkpoint_metadata == META
    assert loaded.training is False and all(not c.training for c in loaded.modules())
    payload = read_checkpoint(path)
    assert payload["format"] == "learnopt-checkpoint" and payload["format_version"] == 1
    assert payload["kind"] == "learned_optimizer" and payload["class"] == "CoordinatewiseLSTM"
    assert payload["learnopt_version"] == learnopt.__version__
    # The file holds only plain data: a strict weights_only load works.
    assert isinstance(_payload(path)["state_dict"]["output.weight"], torch.Tensor)


def test_loaded_module_computes_same_updates(exported):
    m, path = exported
    loaded = learnopt.load(path)
    grads = {"w": torch.tensor([[0.3, -1e-4], [2.0, 0.0]]), "b": torch.tensor([5e-3])}
    u1, s1 = m.update(grads, m.init(grads))
    u2, s2 = loaded.update(grads, loaded.init(grads))
    for k in grads:
        assert torch.equal(u1[k], u2[k])
    assert u1["w"].abs().max() > 0


def test_load_optimizer_steps_like_original(exported):
    m, path = exported
    model_a, model_b = _model(), _model()
    opt_a = m.as_torch_optimizer(model_a.parameters())
    opt_b = learnopt.load_optimizer(path, model_b.parameters())
    assert isinstance(opt_b, torch.optim.Optimizer)
    la = _train(model_a, opt_a, 4)
    lb = _train(model_b, opt_b, 4)
    assert la == lb
    assert la[-1] != la[0]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(model_b.parameters()), next(_model().parameters()))


def test_load_optimizer_accepts_named_parameters_and_options(exported):
    _, path = exported
    model = _model()
    opt = learnopt.load_optimizer(path, model.named_parameters(), check_finite=True)
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="0.weight"):
        opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_optimizer_state_dict_round_trip(exported, tmp_path):
    _, path = exported
    model_ref = _model()
    opt_ref = learnopt.load_optimizer(path, model_ref.parameters())
    ref_losses = _train(model_ref, opt_ref, 5)  # uninterrupted reference

    model = _model()
    opt = learnopt.load_optimizer(path, model.parameters())
    losses = _train(model, opt, 2)
    buf = tmp_path / "opt_state.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved = torch.load(buf, weights_only=True)

    model2 = _model(seed=99)  # different weights, overwritten from the save
    model2.load_state_dict(saved["model"])
    opt2 = learnopt.load_optimizer(path, model2.parameters())
    opt2.load_state_dict(saved["opt"])
    losses += _train(model2, opt2, 3)
    assert losses == ref_losses
    for p, q in zip(model_ref.parameters(), model2.parameters()):
        assert torch.equal(p, q)

    # Without the state the continuation differs (the LSTM state matters).
    model3 = _model(seed=99)
    model3.load_state_dict(saved["model"])
    opt3 = learnopt.load_optimizer(path, model3.parameters())
    assert _train(model3, opt3, 3) != ref_losses[2:]


def test_load_map_location(exported):
    _, path = exported
    loaded = learnopt.load(path, map_location="cpu")
    assert loaded.device == torch.device("cpu")


def test_export_creates_parent_and_overwrites(tmp_path):
    a, b = _module(seed=1), _module(seed=2)
    path = tmp_path / "a" / "b" / "c.pt"
    learnopt.export_checkpoint(a, path)
    learnopt.export_checkpoint(b, path, {"v": 2})
    loaded = learnopt.load(path)
    assert torch.equal(loaded.output.weight, b.output.weight)
    assert not torch.equal(loaded.output.weight, a.output.weight)
    assert loaded.checkpoint_metadata == {"v": 2}
    assert sorted(os.listdir(path.parent)) == ["c.pt"]


def test_export_of_float64_module_loads(tmp_path):
    m = _module(seed=3).double()
    path = learnopt.export_checkpoint(m, tmp_path / "d.pt")
    loaded = learnopt.load(path)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k].to(DT), v)


# --------------------------------------------------------------------------- export failures


def test_export_unregistered_module_raises(tmp_path):
    with pytest.raises(learnopt.CheckpointError, match="Linear"):
        learnopt.export_checkpoint(nn.Linear(2, 2), tmp_path / "x.pt")

    class MyLSTM(CoordinatewiseLSTM):
        pass

    with pytest.raises(learnopt.CheckpointError, match="MyLSTM"):
        learnopt.export_checkpoint(MyLSTM(hidden_size=2), tmp_path / "y.pt")
    assert os.listdir(tmp_path) == []


def test_export_is_atomic(tmp_path, monkeypatch):
    good = _module(seed=4)
    path = learnopt.export_checkpoint(good, tmp_path / "lopt.pt", {"good": True})
    original = path.read_bytes()
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
            f.flush()
        else:
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
        calls.append(f)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        learnopt.export_checkpoint(_module(seed=5), path, {"good": False})
    monkeypatch.undo()
    assert calls, "the simulated failure did not happen inside export_checkpoint"
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["lopt.pt"]  # no temp files left behind
    loaded = learnopt.load(path)
    assert loaded.checkpoint_metadata == {"good": True}
    assert torch.equal(loaded.output.weight, good.output.weight)

    # A failing first export leaves nothing at all.
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        learnopt.export_checkpoint(good, tmp_path / "new.pt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["lopt.pt"]


# --------------------------------------------------------------------------- bad files


def _expect_error(path, *fragments, exc=learnopt.CheckpointError):
    with pytest.raises(exc) as info:
        learnopt.load(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag.lower() in msg.lower(), (frag, msg)
    # load_optimizer reports the same way.
    with pytest.raises(exc) as info2:
        learnopt.load_optimizer(path, [torch.zeros(2, requires_grad=True)])
    assert str(path) in str(info2.value)
    return msg


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "no such file", exc=FileNotFoundError)


def test_directory(tmp_path):
    d = tmp_path / "dir.pt"
    d.mkdir()
    _expect_error(d, "directory")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
                     .numpy().tobytes())
    msg = _expect_error(path, "corrupt")
    assert "refused" not in msg  # random bytes are not a refused pickle


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n"])
def test_empty_and_text_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    _expect_error(path, "corrupt")


def test_truncated_checkpoint(exported, tmp_path):
    _, good = exported
    data = good.read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "corrupt")


@pytest.mark.parametrize(
    "obj,fragment",
    [
        ([1, 2, 3], "not a learnopt checkpoint"),
        (torch.zeros(3), "not a learnopt checkpoint"),
        ({"weights": torch.zeros(3)}, "not a learnopt checkpoint"),
        ({"format": "some-other-format", "format_version": 1}, "not a learnopt checkpoint"),
    ],
    ids=["list", "tensor", "dict_without_tag", "wrong_tag"],
)
def test_not_a_checkpoint(tmp_path, obj, fragment):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    _expect_error(path, fragment)


def _mutated(exported, tmp_path, mutate, name="bad.pt"):
    """The exported file changed by ``mutate`` and saved consistently (its digest recomputed, as
    a writer of a malformed file would), so each check below is reached on its own; altered
    bytes under an old digest are tests/test_reliability.py's."""
    _, good = exported
    payload = _payload(good)
    mutate(payload)
    state = payload.get("state_dict")
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        payload["digest"] = weights_digest(state)
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _set(key, value):
    def f(p):
        p[key] = value

    return f


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (_set("format_version", 99), ["format version 99", "not supported"]),
        (_set("format_version", 0), ["format version 0", "not supported"]),
        (_set("format_version", "1"), ["format version '1'"]),
        (_set("class", "TransformerOptimizer"), ["unknown", "'TransformerOptimizer'"]),
        (_set("kind", "black_box"), ["unknown kind", "'black_box'"]),
        (lambda p: p.pop("config"), ["'config'", "missing"]),
        (_set("state_dict", [1, 2]), ["'state_dict'"]),
        (lambda p: p["config"].update(momentum=0.9), ["config", "momentum"]),
        (lambda p: p["config"].update(preprocess="sqrt"), ["config", "preprocess"]),
        (lambda p: p["state_dict"].pop("output.bias"), ["missing", "output.bias"]),
        (lambda p: p["state_dict"].update(extra=torch.zeros(2)), ["unexpected", "extra"]),
        (lambda p: p["state_dict"].update({"output.weight": torch.zeros(1, 6)}), ["output.weight", "shape", "(1, 6)"]),
        (lambda p: p["config"].update(hidden_size=6), ["shape"]),  # config and weights disagree
        (lambda p: p["state_dict"]["cells.0.weight_hh"].view(-1).__setitem__(3, float("nan")),
         ["cells.0.weight_hh", "nan"]),
        (lambda p: p["state_dict"]["output.bias"].fill_(float("inf")), ["output.bias", "inf"]),
    ],
    ids=[
        "future_version",
        "version_0",
        "version_str",
        "unknown_class",
        "unknown_kind",
        "no_config",
        "state_dict_not_dict",
        "config_unknown_key",
        "config_bad_value",
        "missing_weight",
        "extra_weight",
        "wrong_shape",
        "config_weights_mismatch",
        "nan_weight",
        "inf_weight",
    ],
)
def test_bad_payloads(exported, tmp_path, mutate, fragments):
    path = _mutated(exported, tmp_path, mutate)
    _expect_error(path, *fragments)


def test_missing_and_extra_weights_together(exported, tmp_path):
    def mutate(p):
        p["state_dict"]["output.w"] = p["state_dict"].pop("output.weight")

    msg = _expect_error(_mutated(exported, tmp_path, mutate), "missing", "unexpected")
    assert "output.weight" in msg and "output.w'" in msg


FLAG_NAME = "PWNED"


class _Evil:
    """Unpickling this object (without weights_only) creates the file ``self.flag``."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_code_executing_pickle_is_refused(exported, tmp_path):
    flag = tmp_path / FLAG_NAME
    _, good = exported
    payload = _payload(good)
    payload["metadata"] = {"x": _Evil(str(flag))}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)

    # The payload is live: an unsafe load runs its code (on a second flag, so the test stays clean).
    probe = tmp_path / "probe"
    torch.save({"x": _Evil(str(probe))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    error = None
    try:
        learnopt.load(path)
    except Exception as e:  # checked below, after the flag
        error = e
    assert not flag.exists(), "loading the checkpoint ran code from the file"
    assert isinstance(error, learnopt.CheckpointError), error
    msg = _expect_error(path, "refused", "weights_only")
    assert not flag.exists()

    # A bare pickle (not a torch zip) holding the same object is refused as well and runs nothing.
    raw = tmp_path / "evil.pkl"
    with open(raw, "wb") as f:
        pickle.dump(_Evil(str(flag)), f)
    with pytest.raises(learnopt.CheckpointError) as info:
        learnopt.load(raw)
    assert str(raw) in str(info.value)
    assert not flag.exists()
    assert msg


def test_read_checkpoint_does_not_build(exported, tmp_path):
    # read_checkpoint validates the envelope only; a class problem is reported by load.
    path = _mutated(exported, tmp_path, _set("class", "Nope"))
    payload = read_checkpoint(path)
    assert payload["class"] == "Nope"
    with pytest.raises(learnopt.CheckpointError, match="Nope"):
        learnopt.load(path)


def test_metadata_must_be_plain(tmp_path):
    # Export turns metadata into JSON data, so the file always loads with weights_only=True.
    m = _module(seed=6)
    meta = {"path": tmp_path, "nested": {"t": (1, 2)}, "f": 0.5}
    path = learnopt.export_checkpoint(m, tmp_path / "m.pt", meta)
    loaded = learnopt.load(path)
    assert loaded.checkpoint_metadata == {"path": str(tmp_path), "nested": {"t": [1, 2]}, "f": 0.5}
    assert copy.deepcopy(loaded.checkpoint_metadata) == loaded.checkpoint_metadata


def test_update_config_changes_a_setting_and_keeps_the_weights(tmp_path):
    from learnopt.checkpoint import CheckpointError, update_config
    from learnopt.vsml import VSMLNetwork, online_episode

    torch.manual_seed(0)
    net = VSMLNetwork(state_size=6, message_size=3, rotate_inputs=True)
    path = learnopt.export_checkpoint(net, tmp_path / "v.pt", {"meta_steps": 7})
    update_config(path, note="chosen on held-out streams", ensemble=3)
    got = learnopt.load(path)
    assert got.ensemble == 3 and got.checkpoint_metadata["meta_steps"] == 7
    assert got.checkpoint_metadata["config_changes"] == [{"fields": {"ensemble": 3},
                                                          "note": "chosen on held-out streams"}]
    for k, v in net.state_dict().items():
        assert torch.equal(got.state_dict()[k], v)
    net.ensemble = 3  # the same learner as setting the option by hand
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
    torch.testing.assert_close(online_episode(got, x, y, 3, torch.Generator().manual_seed(0)),
                               online_episode(net, x, y, 3, torch.Generator().manual_seed(0)))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="does not fit VSMLNetwork.*ensemble must be"):
        update_config(path, note="bad", ensemble=0)
    with pytest.raises(CheckpointError, match="does not fit VSMLNetwork"):
        update_config(path, note="unknown", no_such_option=1)
    with pytest.raises(CheckpointError, match="weights' names or shapes"):
        update_config(path, note="more layers", hidden_sizes=[4])
    with pytest.raises(ValueError, match="say why"):
        update_config(path, note="", ensemble=2)
    assert path.read_bytes() == before  # a refused change leaves the file as it was
