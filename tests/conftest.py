import os

import pytest
import torch

# Tests never talk to W&B servers; the ones that check W&B output set "offline" themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny ops: extra threads only add contention on 2-core machines


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory so relative ``runs/`` paths stay inside the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
