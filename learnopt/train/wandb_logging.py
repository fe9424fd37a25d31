"""W&B that never prompts and never blocks: offline unless the user set W&B up."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_mode() -> str:
    """``WANDB_MODE`` if the user set it; ``"online"`` if they are logged in (an API key in the
    environment or in ``~/.netrc``); otherwise ``"offline"``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
        if rc.authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def wandb_init_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``wandb.init`` with the mode resolved and a bounded start-up."""
    import wandb

    kwargs.setdefault("mode", wandb_mode())
    kwargs.setdefault("settings", wandb.Settings(init_timeout=120, silent=True))
    return kwargs


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with learnopt's defaults: project ``learnopt``, files under
    ``runs/``, and the mode from ``wandb_mode()`` (offline unless W&B is set up)."""

    def __init__(
        self,
        project: str = "learnopt",
        save_dir: str = "runs",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        os.makedirs(save_dir, exist_ok=True)
        init = {"group": group, "job_type": job_type, "tags": tags, "notes": notes, "mode": mode}
        init = wandb_init_kwargs(**{k: v for k, v in init.items() if v is not None}, **kwargs)
        super().__init__(project=project, save_dir=save_dir, name=name, **init)
