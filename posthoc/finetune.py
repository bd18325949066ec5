"""Fine-tune an encoder on labelled texts; task heads, linear probes and evaluation on its embeddings.

Merging needs real fine-tunes of one base; this module makes them. A fine-tune is written as two
things side by side in one directory:

- the encoder: a Hugging Face checkpoint with exactly the base's tensor names, shapes and dtypes (it
  loads with `AutoModel.from_pretrained`, and `posthoc merge` takes it like any other checkpoint);
- the task head (`head.safetensors` + `head.json`): a linear layer over mean-pooled token states and the
  names of its classes. Heads stay task-specific and are never merged; encoders are what merges, and a
  merged encoder is evaluated on each task with that task's head.

The training loop is deliberately small and general: an *objective* says how to load the model, how to
turn example indices into a batch, what the loss is and what it saves next to the encoder. The
classification objective is here; the masked-LM, causal-LM and translation-alignment objectives are in
`posthoc.objectives`. A `trainable` predicate selects which encoder tensors train (the others are frozen
and written back unchanged), and entry masks narrow it further: sparse fine-tuning (LT-SFT,
`posthoc.objectives.sparse_finetune`). Models load through `posthoc.models.load_model`.

Training is seeded and single-process: the same seed, data and thread count give the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from posthoc.checkpoint import check_output_location, open_checkpoint, save_state_dict
from posthoc.data import TextClassificationData
from posthoc.errors import CheckpointError, ConfigError, DataError
from posthoc.models import Encoder, load_model, mean_pool
from posthoc.progress import progress_bar
from posthoc.provenance import stamp
from posthoc.threads import default_threads, torch_threads

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
FINETUNE_RECORD = "posthoc_finetune.json"
POOLINGS = ("mean",)


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FinetuneSettings:
    """How long and how hard to train. Defaults: all-MiniLM-L6-v2 on BBC News reaches ~0.9 in 50 steps.

    The head learns from scratch and the encoder only adjusts, hence two learning rates. There is no
    weight decay by default: decay moves every weight, including those a sparse fine-tune means to leave
    untouched, and 50 steps need no regularisation.
    """

    steps: int = 50
    batch_size: int = 16
    max_length: int = 128
    encoder_lr: float = 5e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    # name: (type, low, high, what); the one table `check` validates against.
    RANGES: ClassVar[dict[str, tuple[type, float, float | None, str]]] = {
        "steps": (int, 1, None, "an int >= 1"),
        "batch_size": (int, 1, None, "an int >= 1"),
        "max_length": (int, 2, None, "an int >= 2"),
        "encoder_lr": (float, 0.0, None, "a float >= 0"),
        "head_lr": (float, 0.0, None, "a float >= 0"),
        "weight_decay": (float, 0.0, None, "a float >= 0"),
        "max_grad_norm": (float, 0.0, None, "a float >= 0 (0 turns clipping off)"),
        "seed": (int, 0, None, "an int >= 0"),
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            kind, low, high, what = self.RANGES[f.name]
            value = getattr(self, f.name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (kind is float or isinstance(value, int))
            ok = ok and value >= low and (high is None or value <= high)
            if not ok:
                raise ConfigError(f"The {f.name!r} setting of finetune must be {what}. Got {value!r} instead.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ heads


class ClassificationHead(nn.Module):
    """A linear layer over pooled encoder states, and the names of the classes it predicts."""

    def __init__(self, hidden_size: int, label_names: Sequence[str], pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r} is not supported; use one of {', '.join(POOLINGS)}")
        if len(label_names) < 2:
            raise ConfigError(f"a classification head needs at least 2 classes, got {list(label_names)}")
        self.label_names = tuple(label_names)
        self.pooling = pooling
        self.linear = nn.Linear(hidden_size, len(label_names))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) pooled states -> (batch, classes) logits."""
        return self.linear(embeddings)

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings.to(self.linear.weight.dtype)).argmax(dim=-1)

    @torch.no_grad()
    def accuracy(self, embeddings: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != len(embeddings):
            raise DataError(f"{len(embeddings)} embeddings but {len(labels)} labels")
        if len(labels) == 0:
            raise DataError("cannot measure accuracy on zero examples")
        if int(labels.max()) >= len(self.label_names) or int(labels.min()) < 0:
            raise DataError(f"labels outside 0..{len(self.label_names) - 1} for a head of classes {self.label_names}")
        return float((self.predict(embeddings) == labels).float().mean())

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write head.safetensors (weight, bias) and head.json (classes, pooling), each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {"weight": self.linear.weight.detach().contiguous(), "bias": self.linear.bias.detach().contiguous()}
        tmp = directory / f".{HEAD_WEIGHTS}.{uuid.uuid4().hex[:8]}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / HEAD_WEIGHTS)
        config = {"label_names": list(self.label_names), "pooling": self.pooling, "hidden_size": self.linear.in_features}
        tmp = directory / f".{HEAD_CONFIG}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, directory / HEAD_CONFIG)  # written last: its presence means the head is complete

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ClassificationHead:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / HEAD_CONFIG).is_file() or not (directory / HEAD_WEIGHTS).is_file():
            raise CheckpointError(f"{directory}: no task head ({HEAD_CONFIG} and {HEAD_WEIGHTS}); was it fine-tuned by posthoc?")
        config = json.loads((directory / HEAD_CONFIG).read_text())
        tensors = load_file(str(directory / HEAD_WEIGHTS))
        head = cls(int(config["hidden_size"]), config["label_names"], config.get("pooling", "mean"))
        expected = (len(head.label_names), head.linear.in_features)
        if tuple(tensors["weight"].shape) != expected:
            raise CheckpointError(f"{directory / HEAD_WEIGHTS}: weight has shape {list(tensors['weight'].shape)}, expected {list(expected)}")
        head.linear.load_state_dict(tensors)
        return head


def as_head(head: ClassificationHead | str | os.PathLike[str]) -> ClassificationHead:
    return head if isinstance(head, ClassificationHead) else ClassificationHead.load(head)


def evaluate(
    encoder: Encoder | str | os.PathLike[str],
    head: ClassificationHead | str | os.PathLike[str],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    threads: int | None = None,
    progress: bool = False,
) -> float:
    """Accuracy of `head` on top of `encoder` (a directory or a loaded Encoder); batched, no gradients."""
    encoder = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder)
    head = as_head(head)
    if head.linear.in_features != encoder.hidden_size:
        raise ConfigError(f"head expects hidden size {head.linear.in_features}, the encoder has {encoder.hidden_size}")
    embeddings = encoder.embed(texts, batch_size=batch_size, max_length=max_length, threads=threads, progress=progress)
    return head.accuracy(embeddings, labels)


def linear_probe(
    embeddings: torch.Tensor,
    labels: Sequence[int],
    label_names: Sequence[str],
    *,
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> ClassificationHead:
    """A head trained on fixed embeddings (a frozen encoder): full-batch AdamW on the cross-entropy.

    The embeddings are computed once, so hundreds of full-batch steps cost less than one encoder step:
    the probe is trained to convergence, the strongest no-fine-tune baseline a head can give.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    if len(labels_t) != len(embeddings) or len(labels_t) == 0:
        raise DataError(f"a probe needs as many labels as embeddings (got {len(labels_t)} and {len(embeddings)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ClassificationHead(embeddings.shape[1], label_names)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = embeddings.float()
    with torch_threads(1):  # ops this small run 4x faster on one thread than paying to wake a second
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(x), labels_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


# ------------------------------------------------------------------------------------------- objectives


class Objective(Protocol):
    """A training signal for an encoder.

    It names the transformers auto class the model loads with, owns any task-specific parameters
    (trained next to the encoder, saved beside it, never merged), makes a batch from example indices,
    computes the loss, and describes and saves itself.
    """

    name: str
    auto_class: str

    def __len__(self) -> int: ...
    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module: ...
    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor: ...
    def save(self, directory: Path) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class ClassificationObjective:
    """Cross-entropy of a linear head over mean-pooled states (the head is built at `build` time).

    `head`: the head to start from (a copy trains; the given one is left as it is) instead of a random one,
    e.g. a linear probe of the frozen base: LP-FT (Kumar et al. 2022), where the encoder then moves less and
    only where the task needs it, since the first gradients no longer come from a random head.
    """

    name = "classification"
    auto_class = "AutoModel"

    def __init__(self, data: TextClassificationData, head: ClassificationHead | None = None):
        if len(data) == 0:
            raise DataError(f"{data.name}: no examples to fine-tune on")
        missing = [n for n, c in data.counts().items() if c == 0]
        if missing:
            raise DataError(f"{data.name}: class {missing[0]!r} has no training examples")
        if head is not None and tuple(head.label_names) != tuple(data.label_names):
            raise ConfigError(f"{data.name}: the initial head predicts {list(head.label_names)}, the data has {list(data.label_names)}")
        self.data = data
        self.initial_head = head
        self.head: ClassificationHead | None = None

    def __len__(self) -> int:
        return len(self.data)

    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        self.head = ClassificationHead(int(model.config.hidden_size), self.data.label_names)
        if self.initial_head is not None:
            if self.initial_head.linear.in_features != self.head.linear.in_features:
                raise ConfigError(f"the initial head expects hidden size {self.initial_head.linear.in_features}, "
                                  f"the model has {self.head.linear.in_features}")  # fmt: skip
            self.head.linear.load_state_dict(self.initial_head.linear.state_dict())
        return self.head

    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor:
        texts = [self.data.texts[i] for i in indices]
        labels = torch.tensor([self.data.labels[i] for i in indices])
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (batch, tokens, hidden)
        logits = self.head(mean_pool(hidden, batch["attention_mask"]))  # (batch, classes)
        return nn.functional.cross_entropy(logits, labels)

    def save(self, directory: Path) -> None:
        self.head.save(directory)

    def describe(self) -> dict[str, Any]:
        return {"objective": self.name, "data": self.data.name, "examples": len(self.data), "classes": self.data.counts(),
                "head_init": "random" if self.initial_head is None else "given"}  # fmt: skip


OBJECTIVES: dict[str, Callable[[Any], Objective]] = {"classification": ClassificationObjective}


# --------------------------------------------------------------------------------------------- training


def batch_indices(num_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The examples each step sees: seeded permutations of the data, one after another, cut in batches.

    Deterministic and shared, so a baseline can be trained on exactly the examples a fine-tune saw.
    """
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(num_examples, generator=generator).tolist()
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@dataclass
class FinetuneResult:
    out_dir: Path
    seconds: float
    losses: list[float]
    settings: FinetuneSettings
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def head(self) -> ClassificationHead:
        return ClassificationHead.load(self.out_dir)


def finetune(
    base_dir: str | os.PathLike[str],
    data: TextClassificationData | Objective,
    out_dir: str | os.PathLike[str],
    *,
    settings: FinetuneSettings | None = None,
    trainable: Callable[[str], bool] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = True,
    name: str | None = None,
    extra_record: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune the encoder in `base_dir` on `data` and write encoder + head to `out_dir`.

    `data` is labelled text (a classification head is trained with it) or any `Objective`.
    `trainable(name)` picks the encoder parameters that train (default: all); the others stay exactly
    as in the base. `masks` (name -> bool tensor of the parameter's shape) narrows training to entries:
    only parameters named in it train, and only where the mask is true (sparse fine-tuning, LT-SFT; see
    `posthoc.objectives.sparse_finetune`); the other entries keep the base's values exactly. The output
    holds every tensor of the base checkpoint, same names, shapes and dtypes (buffers the model does not
    own, such as BERT's `position_ids`, are copied from the base), the base's config and tokenizer files,
    the objective's files (head) and `posthoc_finetune.json` (settings, losses, a `run_id`, and
    `extra_record` under "extra": what a caller needs to recognise the run later).
    """
    settings = settings or FinetuneSettings()
    base_dir = Path(base_dir)
    objective: Objective = ClassificationObjective(data) if isinstance(data, TextClassificationData) else data
    if masks is not None and settings.weight_decay > 0:
        raise ConfigError("sparse fine-tuning (masks) needs weight_decay 0: decay would move the entries outside the mask")
    started = time.perf_counter()
    check_output_location(Path(out_dir), [base_dir], force)  # before minutes of training, not after
    with open_checkpoint(base_dir) as base:
        base_infos = dict(base.tensors)
    model, tokenizer, _ = load_model(base_dir, auto_class=objective.auto_class)

    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # head initialisation and dropout
        task_module = objective.build(model, tokenizer)
        encoder_params = _trainable_parameters(model, trainable, masks)
        groups = [{"params": encoder_params, "lr": settings.encoder_lr}]
        if list(task_module.parameters()):
            groups.append({"params": list(task_module.parameters()), "lr": settings.head_lr})
        losses = _train(model, tokenizer, task_module, objective, groups, settings, masks,
                        f"fine-tune {name or objective.name}", progress)  # fmt: skip

    state = _encoder_state(model, base_dir, base_infos)
    seconds = time.perf_counter() - started
    record = {
        **stamp(),
        "run_id": uuid.uuid4().hex,
        "name": name,
        "base_model": str(base_dir),
        "settings": settings.to_dict(),
        "trainable": "all" if trainable is None and masks is None else "subset",
        "masked_entries": None if masks is None else int(sum(int(m.sum()) for m in masks.values())),
        "threads": threads or default_threads(),
        "seconds": round(seconds, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(v, 5) for v in losses],
        **objective.describe(),
        "extra": extra_record or {},
    }
    out = save_state_dict(state, out_dir, copy_from=base_dir, force=force, protect=[base_dir])
    objective.save(out)
    # Written last, so its presence means encoder and head are both complete.
    (out / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("fine-tuned %s in %.1f s: loss %.3f -> %.3f", out, seconds, losses[0], losses[-1])
    return FinetuneResult(out, seconds, losses, settings, record)


def _trainable_parameters(
    model: nn.Module, trainable: Callable[[str], bool] | None, masks: dict[str, torch.Tensor] | None
) -> list[nn.Parameter]:
    """Set requires_grad on every encoder parameter (`trainable`, narrowed to those `masks` names) and
    return those that train; a mask must have its parameter's shape."""
    chosen = []
    for param_name, param in model.named_parameters():
        wanted = trainable is None or bool(trainable(param_name))
        if masks is not None:
            wanted = wanted and param_name in masks
            if param_name in masks and tuple(masks[param_name].shape) != tuple(param.shape):
                raise ConfigError(
                    f"mask for {param_name} has shape {list(masks[param_name].shape)}, the parameter {list(param.shape)}"
                )
        param.requires_grad_(wanted)
        if param.requires_grad:
            chosen.append(param)
    return chosen


def _train(
    model: nn.Module,
    tokenizer: Any,
    task_module: nn.Module,
    objective: Objective,
    groups: list[dict[str, Any]],
    settings: FinetuneSettings,
    masks: dict[str, torch.Tensor] | None,
    label: str,
    progress: bool,
) -> list[float]:
    """The training loop: AdamW over `groups` on the seeded batch schedule; the loss of every step.

    Model and task module are left in eval mode."""
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    model.train()
    task_module.train()
    losses: list[float] = []
    schedule = batch_indices(len(objective), settings.steps, settings.batch_size, settings.seed)
    with progress_bar(len(schedule), label, "step", enabled=progress) as bar:
        for indices in schedule:
            loss = objective.loss(model, tokenizer, indices, settings.max_length)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:  # sparse fine-tuning: entries outside the mask get no gradient
                for param_name, param in model.named_parameters():
                    if param.grad is not None:
                        param.grad.mul_(masks[param_name])
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], settings.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    model.eval()
    task_module.eval()
    return losses


def _encoder_state(model: nn.Module, base_dir: Path, base_infos: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained tensors under the base checkpoint's names, shapes and dtypes, in the base's order."""
    trained = model.state_dict()
    # A tied copy (a language model's output layer sharing the input embeddings) that the checkpoint stores
    # once is not a tensor of its own: drop it when its storage is that of a tensor the base has.
    stored = {t.untyped_storage().data_ptr() for n, t in trained.items() if n in base_infos}
    trained = {n: t for n, t in trained.items() if n in base_infos or t.untyped_storage().data_ptr() not in stored}
    unknown = sorted(set(trained) - set(base_infos))
    if unknown:
        raise CheckpointError(
            f"{base_dir}: the model has tensor {unknown[0]!r}, which the checkpoint lacks; transformers must "
            "have renamed or added it, so the fine-tune could not be written under the base's names"
        )
    state = {}
    with open_checkpoint(base_dir) as base:
        for name, info in base_infos.items():
            tensor = trained[name].detach() if name in trained else base.read(name)
            if tuple(tensor.shape) != info.shape:
                raise CheckpointError(f"tensor {name}: trained shape {list(tensor.shape)} differs from the base's {list(info.shape)}")
            state[name] = tensor.to(info.dtype).contiguous()
    return state


def read_record(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `posthoc_finetune.json` of a complete fine-tune, or None when there is none."""
    path = Path(directory) / FINETUNE_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
