"""Small character-level language models on a text corpus that ships with the repository
(``tasks/data/python_docs.txt``, 125 KB of the Python Language Reference; see
``tasks/data/README.md`` for its source and license).

Two models, batched over instances (each has its own weights and its own windows):

- ``"mlp"``: the neural probabilistic language model of Bengio et al. 2003 (JMLR 3) at the
  character level: embed the ``context`` previous characters, concatenate, one tanh hidden
  layer, softmax over the vocabulary; the loss is the cross-entropy of the next character.
- ``"rnn"``: an Elman RNN (Elman 1990), ``h_t = tanh(e_t W_ih + h_{t-1} W_hh + b_h)``, ``h_0 = 0``,
  read out by a linear layer at every step; the loss is the mean cross-entropy of the next
  character over the ``context`` positions of the window (the character-RNN setting of
  Karpathy's char-rnn and of many learned-optimizer benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from learnopt.task import Params, Task, generator_device

DATA_DIR = Path(__file__).parent / "data"
MODELS = ("mlp", "rnn")


def load_corpus(corpus: str) -> str:
    """The text of a bundled corpus (``"python_docs"`` is ``tasks/data/python_docs.txt``) or of a
    text file at the path ``corpus``.

    Args:
        corpus: a bundled corpus name or a path.
    Returns:
        The text.
    Raises:
        FileNotFoundError: neither exists.
    """
    path = DATA_DIR / f"{corpus}.txt"
    if not path.is_file():
        path = Path(corpus).expanduser()
    if not path.is_file():
        bundled = sorted(p.stem for p in DATA_DIR.glob("*.txt") if p.stem.islower())  # not PYTHON_LICENSE
        raise FileNotFoundError(f"corpus {corpus!r} is neither a bundled corpus ({', '.join(bundled)}) nor a file")
    return path.read_text(encoding="utf-8")


@dataclass
class CharLMTask:
    """``num_instances`` character models of one architecture on ``tokens`` (int64 [T]).

    A batch is ``[n, batch_size, context + 1]`` windows of tokens (instance ``k``'s own windows).
    Parameters (``V`` vocabulary, ``e`` embedding, ``h`` hidden, ``T`` context), all with a
    leading ``n``: ``embed`` [V, e]; ``"mlp"``: ``w0`` [T e, h], ``b0`` [h], ``w1`` [h, V], ``b1`` [V];
    ``"rnn"``: ``w_ih`` [e, h], ``w_hh`` [h, h], ``b_h`` [h], ``w_out`` [h, V], ``b_out`` [V].

    Args:
        model: ``"mlp"`` or ``"rnn"``.
        context: ``T``, characters read.
        embed_dim: ``e``.
        hidden_size: ``h``.
        vocab_size: ``V``.
        tokens: ``[N]`` int64, the corpus.
        batch_size: windows per instance and step.
        n: number of instances.
        eval_windows: fixed windows of ``full_loss``.
        dtype: dtype of the parameters.
    """

    model: str
    context: int
    embed_dim: int
    hidden_size: int
    vocab_size: int
    tokens: Tensor
    batch_size: int
    n: int
    eval_windows: int = 1024
    dtype: torch.dtype = torch.float32

    @property
    def num_instances(self) -> int:
        """Number of models ``n``."""
        return self.n

    @property
    def loss_scale(self) -> float:
        """log V: the cross-entropy of a uniform prediction over the vocabulary."""
        return math.log(self.vocab_size)

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-instance shapes and their initialisation (torch.nn's defaults for each layer)."""
        V, e, h, T = self.vocab_size, self.embed_dim, self.hidden_size, self.context
        shapes = {"embed": ((V, e), "normal")}  # nn.Embedding: N(0, 1)
        if self.model == "mlp":
            shapes |= {"w0": ((T * e, h), T * e), "b0": ((h,), T * e), "w1": ((h, V), h), "b1": ((V,), h)}
        else:  # nn.RNN draws everything from U(±1/sqrt(hidden)); nn.Linear for the read-out
            shapes |= {"w_ih": ((e, h), h), "w_hh": ((h, h), h), "b_h": ((h,), h), "w_out": ((h, V), h),
                       "b_out": ((V,), h)}
        return shapes

    def init(self, generator: torch.Generator | None = None) -> Params:
        """torch.nn's default initialisation of each layer (``nn.Embedding``: N(0, 1)).

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{name: [n, ...]}`` (the class docstring's shapes).
        """
        params = {}
        for name, (shape, fan) in self._shapes().items():
            if fan == "normal":
                p = torch.randn((self.n, *shape), generator=generator, device=generator_device(generator))
            else:
                u = torch.rand((self.n, *shape), generator=generator, device=generator_device(generator))
                p = (u * 2 - 1) / math.sqrt(fan)
            params[name] = p.to(device=self.tokens.device, dtype=self.dtype)
        return params

    def _windows(self, starts: Tensor) -> Tensor:
        return self.tokens[starts[..., None] + torch.arange(self.context + 1, device=self.tokens.device)]

    def sample_batch(self, generator: torch.Generator | None = None) -> Tensor:
        """Random windows, ``batch_size`` per instance.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``[n, batch_size, context + 1]`` int64 windows.
        """
        high = len(self.tokens) - self.context
        starts = torch.randint(high, (self.n, self.batch_size), generator=generator, device=generator_device(generator))
        starts = starts.to(self.tokens.device)
        return self._windows(starts)

    def _embed(self, params: Params, idx: Tensor) -> Tensor:
        """[n, B, T, e] from per-instance ``idx`` [n, B, T] or shared ``idx`` [B, T]."""
        E = params["embed"]
        if idx.dim() == 2:
            return E[:, idx]
        return E[torch.arange(self.n, device=idx.device)[:, None, None], idx]

    def logits(self, params: Params, inputs: Tensor) -> Tensor:
        """``"mlp"``: the logits of the character after ``inputs``; ``"rnn"``: one per position.

        Args:
            params: the parameters.
            inputs: ``[n, B, T]`` or shared ``[B, T]`` token ids.
        Returns:
            ``[n, B, V]`` (``"mlp"``) or ``[n, B, T, V]`` (``"rnn"``).
        """
        x = self._embed(params, inputs)
        n, B, T, e = x.shape
        if self.model == "mlp":
            h = torch.tanh(torch.bmm(x.reshape(n, B, T * e), params["w0"]) + params["b0"][:, None, :])
            return torch.bmm(h, params["w1"]) + params["b1"][:, None, :]
        pre = torch.einsum("nbte,neh->nbth", x, params["w_ih"]) + params["b_h"][:, None, None, :]
        h = pre.new_zeros(n, B, self.hidden_size)
        states = []
        for t in range(T):
            h = torch.tanh(pre[:, :, t] + torch.bmm(h, params["w_hh"]))
            states.append(h)
        hs = torch.stack(states, dim=2).reshape(n, B * T, -1)
        return (torch.bmm(hs, params["w_out"]) + params["b_out"][:, None, :]).reshape(n, B, T, -1)

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """Mean next-character cross-entropy of each instance on its windows (the evaluation
        windows when ``batch`` is ``None``).

        Args:
            params: the parameters, as ``init`` returns them.
            batch: ``[n, B, context + 1]`` or shared ``[B, context + 1]`` windows; None: the evaluation windows.
        Returns:
            ``[num_instances]`` losses.
        """
        windows = self._eval_windows() if batch is None else batch
        logits = self.logits(params, windows[..., :-1])
        targets = windows[..., -1] if self.model == "mlp" else windows[..., 1:]
        if windows.dim() == 2:  # windows shared by all instances
            targets = targets.expand(logits.shape[:-1])
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")
        return ce.view(self.n, -1).mean(-1)

    def _eval_windows(self) -> Tensor:
        # integer arithmetic: start_j = floor(j * last / (W - 1)), exact on every device
        last, W = len(self.tokens) - self.context - 1, self.eval_windows
        starts = torch.arange(W, device=self.tokens.device) * last // max(W - 1, 1)
        return self._windows(starts)

    def full_loss(self, params: Params) -> Tensor:
        """Mean loss over ``eval_windows`` fixed windows spread evenly over the corpus, starting at
        ``floor(j * (T - context - 1) / (eval_windows - 1))`` (the same for every instance): all
        125,000 windows at every step would dominate an evaluation.

        Args:
            params: the parameters.
        Returns:
            ``[num_instances]`` losses on the evaluation windows.
        """
        return self.loss(params, None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CharLMTask:
        """On ``device``; ``dtype`` is that of the parameters ``init`` returns (tokens stay integers).

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the parameters (None: unchanged).
        Returns:
            A ``CharLMTask`` with the same instances.
        """
        return CharLMTask(self.model, self.context, self.embed_dim, self.hidden_size, self.vocab_size,
                          self.tokens.to(device), self.batch_size, self.n, self.eval_windows, dtype or self.dtype)


class CharLMFamily:
    """Character-level language models (``model="mlp"`` or ``"rnn"``, see the module docstring)
    on ``corpus`` (a bundled corpus name or a text file), reading ``context`` characters.
    Instances differ in initial weights and windows. The vocabulary is the corpus's sorted set
    of characters (``vocab``). ``normalize`` divides by log V.

    Args:
        model: ``"mlp"`` or ``"rnn"``.
        context: characters read.
        embed_dim: embedding size.
        hidden_size: hidden units.
        batch_size: windows per instance and step.
        corpus: a bundled corpus name or a text file.
        eval_windows: fixed windows of ``full_loss``.
    Raises:
        ValueError: an unknown model, a size below 1, or a corpus too short for ``context``.
        FileNotFoundError: no such corpus.
    References:
        Bengio et al. 2003, JMLR 3 (``"mlp"``); Elman 1990 (``"rnn"``).
    """

    def __init__(
        self,
        model: str = "mlp",
        context: int = 16,
        embed_dim: int = 16,
        hidden_size: int = 64,
        batch_size: int = 32,
        corpus: str = "python_docs",
        eval_windows: int = 1024,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"CharLMFamily: model must be one of {MODELS}, got {model!r}")
        for what, v in (("context", context), ("embed_dim", embed_dim), ("hidden_size", hidden_size),
                        ("batch_size", batch_size), ("eval_windows", eval_windows)):
            if v < 1:
                raise ValueError(f"CharLMFamily: {what} must be >= 1, got {v}")
        text = load_corpus(corpus)
        if len(text) <= context + 1:
            raise ValueError(f"CharLMFamily: corpus {corpus!r} has {len(text)} characters, too few for "
                             f"context={context}")
        self.vocab = "".join(sorted(set(text)))
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        self.tokens = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
        self.model, self.context, self.embed_dim, self.hidden_size = model, context, embed_dim, hidden_size
        self.batch_size, self.corpus, self.eval_windows = batch_size, corpus, eval_windows
        self.loss_scale = math.log(len(self.vocab))
        self.name = f"charlm_{Path(corpus).stem}_{model}{hidden_size}_ctx{context}"

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``CharLMTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``CharLMTask`` of ``n`` instances.
        Raises:
            ValueError: ``num_instances < 1``.
        """
        if num_instances < 1:
            raise ValueError(f"CharLMFamily.sample: num_instances must be >= 1, got {num_instances}")
        return CharLMTask(self.model, self.context, self.embed_dim, self.hidden_size, len(self.vocab), self.tokens,
                          self.batch_size, num_instances, self.eval_windows)
