"""Subnetwork masks (Csordás et al., ICLR 2021): learn which weights, or which FFN neurons, a task needs.

The model's weights stay frozen. Every masked weight (or every FFN neuron, `granularity="neuron"`) gets a
logit l; each training step samples a hard binary mask with the Gumbel-sigmoid trick

    m = 1[σ((l + g) / τ) > ½],   g ~ Logistic(0, 1)        (so P(m = 1) = σ(l), whatever τ)

and passes gradients straight through the soft sample σ((l + g)/τ). The loss is

    task loss + α · N · density = task loss + α · Σ σ(l)      (density = Σ σ(l) / N, the expected kept fraction)

with the density counted in kept entries, as in Csordás et al. (who add α · Σ l): α is the task loss one
kept entry must be worth, and the per-logit pull α·σ'(l) is what Adam weighs against that logit's task
gradient (a mean density would make the pull shrink with the model's size). On all-MiniLM-L6-v2 the task
gradient of a weight's logit is ~6e-7 (median) and of a neuron's ~5e-6; α = 5e-5 on weights (lr 0.1, 120
steps of 8 texts) keeps 7-9 % of the weights there, with held-out accuracy 0.87 and 1.00 against 0.90 and
0.99 for the full model on two BBC topic tasks (benchmarks/RESULTS.md); the neuron default, 5e-4, is scaled
by the same gradient ratio. Logits start at 2.0 (σ = 0.88: everything on); the
final mask is l > 0.

Tasks: a classification head on labelled texts (the head given, or a linear probe fitted on the full
model's embeddings, frozen while the mask learns), or the language-model loss of a causal LM on a list of
texts (one mask per language or per domain).

Masked are the 2-D weights of every linear map inside the transformer blocks (attention and FFN), not
embeddings, norms or biases; with `granularity="neuron"` one logit per FFN neuron scales its column of
W_down (the same as zeroing the neuron). The masked model runs through `torch.func.functional_call` with
the masked weights substituted, so the loaded model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from posthoc.analyse.base import Analyser, frozen
from posthoc.analyse.calibration import is_causal_lm
from posthoc.analyse.evaluate import pooled_states
from posthoc.analyse.params import DIRECTORY, Param, ParamTable, choice, is_int, is_number
from posthoc.analyse.texts import TokenizedTexts
from posthoc.checkpoint import open_checkpoint
from posthoc.data import TextClassificationData
from posthoc.errors import ConfigError, DataError, IncompatibleError
from posthoc.ffn import find_ffns
from posthoc.finetune import ClassificationHead, as_head, batch_indices, linear_probe
from posthoc.modules.masks import checkpoint_name, neuron_entries, neuron_mask_name, write_mask_module
from posthoc.progress import progress_bar
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)

GRANULARITIES = ("weight", "neuron")
TASKS = ("auto", "classification", "lm")
WHICH = ("full", "mask", "inverted", "random")
DEFAULT_ALPHA = {"weight": 5e-5, "neuron": 5e-4}
_LAYER = re.compile(r"\.(\d+)\.")


# ------------------------------------------------------------------------------------------- kernels


def sample_hard_mask(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A hard 0/1 Gumbel-sigmoid sample of `logits` with a straight-through gradient (same shape)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # Logistic(0, 1): the difference of two Gumbel samples
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # forward: exactly hard (x − x = 0); backward: d soft / d logits


def mask_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Intersection over union of the entries two masks keep (over all masked tensors, which must match)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[0]
        raise IncompatibleError(f"the two masks do not cover the same tensors (e.g. {only!r}); learn them alike")
    inter = union = 0
    for name in a:
        if a[name].shape != b[name].shape:
            raise IncompatibleError(f"mask of {name!r}: shapes {list(a[name].shape)} and {list(b[name].shape)}")
        inter += int((a[name] & b[name]).sum())
        union += int((a[name] | b[name]).sum())
    return inter / union if union else 1.0


@dataclass(frozen=True)
class MaskTarget:
    """A weight the mask multiplies: the logits have the weight's shape, or (1, d_ff) for FFN neurons."""

    tensor: str  # parameter name in the model, e.g. "encoder.layer.0.output.dense.weight"
    layer: int  # transformer block index
    role: str  # attention | ffn_up | ffn_gate | ffn_down | ffn_neurons | other
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def mask_targets(model: nn.Module, granularity: str, ffn_modules: str | None = None) -> list[MaskTarget]:
    """What a mask of this granularity covers in `model` (see the module docstring)."""
    ffns = find_ffns(model, ffn_modules)
    if granularity == "neuron":
        return [
            MaskTarget(f"{f.down}.weight", f.index, "ffn_neurons", (1, model.get_submodule(f.down).in_features))
            for f in ffns
        ]
    roles = {}
    for f in ffns:
        roles.update({f.up: "ffn_up", f.down: "ffn_down"})
        if f.gate:
            roles[f.gate] = "ffn_gate"
    targets = []
    for name, module in model.named_modules():
        match = _LAYER.search(f".{name}.")
        if isinstance(module, nn.Linear) and match:
            role = roles.get(name, "attention" if "attn" in name or "attention" in name else "other")
            targets.append(MaskTarget(f"{name}.weight", int(match.group(1)), role, tuple(module.weight.shape)))
    if not targets:
        raise IncompatibleError(f"{type(model).__name__}: no linear maps inside numbered transformer blocks to mask")
    return targets


# --------------------------------------------------------------------------------------------- tasks


class ClassificationTask:
    """Cross-entropy of a (frozen) linear head over mean-pooled states; scored by accuracy."""

    kind = "classification"
    metric = "accuracy"

    def __init__(self, data: TextClassificationData, head: ClassificationHead | str | os.PathLike[str] | None):
        present = sorted({data.label_names[y] for y in data.labels})
        if len(present) < 2:
            raise DataError(
                f"{data.name}: a classification task needs examples of at least 2 classes; found only "
                f"{present or 'none'} (choose more classes or another data set)"
            )
        self.data = data
        # a copy: the caller's head is left as it was (prepare freezes it)
        self.head = None if head is None else as_head(copy.deepcopy(head) if isinstance(head, ClassificationHead) else head)
        if self.head is not None and tuple(self.head.label_names) != tuple(data.label_names):
            raise DataError(
                f"{data.name}: the head predicts {list(self.head.label_names)} but the data's classes are "
                f"{list(data.label_names)}"
            )

    def __len__(self) -> int:
        return len(self.data)

    def prepare(self, model: nn.Module, tokenizer: Any, max_length: int, batch_size: int, progress: bool) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.texts = TokenizedTexts(tokenizer, self.data.texts, max_length)
        self.labels = torch.tensor(self.data.labels)
        if self.head is None:  # the function to keep: a probe on the full model's embeddings
            embeddings = torch.empty(len(self.data), _hidden_size(model))
            with torch.no_grad(), progress_bar(len(self.data), "probe embeddings", "text", enabled=progress) as bar:
                bar.leave = False
                for rows in self.texts.by_length(batch_size):
                    embeddings[rows] = pooled_states(model, {}, self.texts.batch(rows))
                    bar.update(len(rows))
            self.head = linear_probe(embeddings, self.data.labels, self.data.label_names)
        if self.head.linear.in_features != _hidden_size(model):
            raise ConfigError(
                f"the head expects hidden size {self.head.linear.in_features}, the model has {_hidden_size(model)}"
            )
        for p in self.head.parameters():
            p.requires_grad_(False)

    def _logits(self, model: nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(pooled_states(model, params, batch))  # (batch, classes)

    def loss(self, model: nn.Module, params: dict[str, torch.Tensor], rows: Sequence[int]) -> torch.Tensor:
        return nn.functional.cross_entropy(self._logits(model, params, self.texts.batch(rows)), self.labels[rows])

    @torch.no_grad()
    def score(self, model: nn.Module, params: dict[str, torch.Tensor], data: Any, max_length: int, batch_size: int) -> float:
        data = _check_classification(data, self.data)
        texts = TokenizedTexts(self.texts.tokenizer, data.texts, max_length)
        labels = torch.tensor(data.labels)
        correct = 0
        for rows in texts.by_length(batch_size):
            correct += int((self._logits(model, params, texts.batch(rows)).argmax(-1) == labels[rows]).sum())
        return correct / len(data)


class LanguageModelTask:
    """Next-token cross-entropy of a causal LM on texts; scored by the mean loss per predicted token."""

    kind = "lm"
    metric = "loss"

    def __init__(self, texts: Sequence[str]):
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise DataError("a language-model task needs at least one non-empty text")
        self.data = texts

    def __len__(self) -> int:
        return len(self.data)

    def prepare(self, model: nn.Module, tokenizer: Any, max_length: int, batch_size: int, progress: bool) -> None:
        if not is_causal_lm(model):
            raise ConfigError(
                f"{type(model).__name__} is not a causal language model; learn an LM-loss mask on a decoder "
                "(e.g. Llama/SmolLM2), or give labelled texts for a classification mask"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.texts = TokenizedTexts(tokenizer, self.data, max_length)

    @staticmethod
    def _sums(model: nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
        logits = functional_call(model, params, args=(), kwargs=batch).logits[:, :-1]  # (batch, tokens-1, vocab)
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return total, int((targets != -100).sum())

    def loss(self, model: nn.Module, params: dict[str, torch.Tensor], rows: Sequence[int]) -> torch.Tensor:
        total, count = self._sums(model, params, self.texts.batch(rows))
        return total / max(count, 1)

    @torch.no_grad()
    def score(self, model: nn.Module, params: dict[str, torch.Tensor], data: Any, max_length: int, batch_size: int) -> float:
        texts = TokenizedTexts(self.texts.tokenizer, LanguageModelTask(_as_texts(data)).data, max_length)
        total, count = 0.0, 0
        for rows in texts.by_length(batch_size):
            t, c = self._sums(model, params, texts.batch(rows))
            total, count = total + float(t), count + c
        if count == 0:
            raise DataError("the texts give no token to predict (each needs at least 2 tokens)")
        return total / count


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _as_texts(data: Any) -> list[str]:
    if isinstance(data, TextClassificationData):
        return list(data.texts)
    if isinstance(data, str) or not isinstance(data, Sequence):
        raise DataError(f"a language-model task takes a list of texts, got {type(data).__name__}")
    return list(data)


def _check_classification(data: Any, train: TextClassificationData) -> TextClassificationData:
    if not isinstance(data, TextClassificationData):
        raise DataError(f"a classification task is scored on labelled texts, got {type(data).__name__}")
    if tuple(data.label_names) != tuple(train.label_names):
        raise DataError(
            f"{data.name}: classes {list(data.label_names)} do not match the task's {list(train.label_names)}"
        )
    if len(data) == 0:
        raise DataError(f"{data.name}: no examples to score")
    return data


# ----------------------------------------------------------------------------------------- estimator


PARAMS = ParamTable("SubnetworkMasker", [
    choice("granularity", "weight", GRANULARITIES,
           "weight: one logit per weight of every block linear map; neuron: one per FFN neuron."),
    Param("alpha", None, "None or a number > 0", lambda v, p: v is None or (is_number(v) and v > 0),
          "Weight of the density term per kept entry (None: 5e-5 for weights, 5e-4 for neurons).", float),
    Param("steps", 200, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Mask training steps.", int),
    Param("batch_size", 16, "an int >= 1", lambda v, p: is_int(v) and v >= 1, "Texts per step.", int),
    Param("lr", 0.1, "a number > 0", lambda v, p: is_number(v) and v > 0, "Adam learning rate of the logits.", float),
    Param("init_logit", 2.0, "a number", lambda v, p: is_number(v), "Initial logit (2.0: P(keep) = 0.88).", float),
    Param("temperature", 1.0, "a number > 0", lambda v, p: is_number(v) and v > 0, "Gumbel-sigmoid temperature.", float),
    Param("max_length", 128, "an int >= 2", lambda v, p: is_int(v) and v >= 2, "Tokens per text.", int),
    choice("task", "auto", TASKS, "auto: classification for labelled texts, lm for plain texts.",
           cli=False),  # `split mask --task` gives the tasks' data
    Param("head", None, "None, a ClassificationHead or the directory of one",
          lambda v, p: v is None or isinstance(v, (ClassificationHead, str, os.PathLike)),
          "The head whose function the mask keeps (default: a linear probe on the full model).", DIRECTORY),
    Param("ffn_modules", None, "None or 'up=P,down=P[,gate=P][,act=NAME]'",
          lambda v, p: v is None or isinstance(v, (str, dict)), "FFN modules of models posthoc does not know.", str),
    Param("seed", 0, "an int >= 0", lambda v, p: is_int(v) and v >= 0, "Seed of the probe, batches and samples.", int),
    Param("threads", None, "None or an int >= 1", lambda v, p: v is None or (is_int(v) and v >= 1), "torch threads.", int),
    Param("progress", True, "a bool", lambda v, p: isinstance(v, bool), "Show progress bars.", bool, cli=False),
])


class SubnetworkMasker(Analyser, params=PARAMS):
    """Learn a binary mask over a frozen model's weights (or FFN neurons) that keeps one task working (the
    analyser contract of `posthoc.analyse.base`).

    fit(model, data): `model` is a checkpoint spec (directory, GGUF, hub id) or a loaded transformers
    model (then pass `tokenizer=`; it is left as it was); `data` is a TextClassificationData
    (classification task) or a list of texts (language-model task, needs a causal LM).

    Learned attributes
        targets_          list[MaskTarget]: what the mask covers
        logits_           {tensor: logits}; mask_ {tensor: bool mask} (logit > 0), broadcastable to the weight
        density_          kept fraction of all masked entries; layer_density_ {layer: kept fraction};
                          role_density_ {role: kept fraction}
        alpha_            the density weight used (`alpha`, or the granularity's default)
        history_          per step: task loss, expected density
        head_             the frozen classification head (classification tasks)
        task_, metric_    "classification"/"accuracy" or "lm"/"loss"
        objective_        the task's loss and score (ClassificationTask or LanguageModelTask), for `score`
        model_, tokenizer_  the model the mask was learned on and its tokenizer, for `score`
        ffns_             the model's FFNs (neuron masks)
        source_           the checkpoint directory (None when fitted on a loaded model)
        seconds_          training time
    """

    # -------------------------------------------------------------------------------------------- fit

    def _make_task(self, data: Any) -> ClassificationTask | LanguageModelTask:
        kind = self.task
        if kind == "auto":
            kind = "classification" if isinstance(data, TextClassificationData) else "lm"
        if kind == "classification":
            if not isinstance(data, TextClassificationData):
                raise DataError(f"a classification task needs labelled texts, got {type(data).__name__}")
            if len(data) == 0:
                raise DataError(f"{data.name}: no examples to learn a mask on")
            return ClassificationTask(data, self.head)
        return LanguageModelTask(_as_texts(data))

    def fit(self, model: Any, data: TextClassificationData | Sequence[str], *, tokenizer: Any = None) -> SubnetworkMasker:
        """Learn the mask. model: a checkpoint spec or a loaded transformers model (with `tokenizer`)."""
        self.validate_params()
        task = self._make_task(data)  # data errors before minutes of loading
        started = time.perf_counter()
        model, tokenizer = self.model_for_fit(model, tokenizer)
        targets = mask_targets(model, self.granularity, self.ffn_modules)
        self.alpha_ = self.alpha if self.alpha is not None else DEFAULT_ALPHA[self.granularity]
        with frozen(model), torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            task.prepare(model, tokenizer, self.max_length, self.batch_size * 4, self.progress)
            logits, self.history_ = self._learn(model, task, targets)
        self.targets_ = targets
        self.logits_ = {name: z.detach() for name, z in logits.items()}
        self.mask_ = {name: z > 0 for name, z in self.logits_.items()}
        self.head_ = getattr(task, "head", None)
        self.task_ = task.kind
        self.metric_ = task.metric
        self.ffns_ = find_ffns(model, self.ffn_modules)
        self.seconds_ = time.perf_counter() - started
        self.model_, self.tokenizer_, self.objective_ = model, tokenizer, task
        self._summarise()
        log.info("mask learned in %.1f s: density %.4f", self.seconds_, self.density_)
        return self

    def _learn(self, model: nn.Module, task: ClassificationTask | LanguageModelTask, targets: list[MaskTarget]
               ) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
        """The training loop (see the module docstring): (logits per masked tensor, history per step)."""
        weights = {t.tensor: model.get_parameter(t.tensor).detach() for t in targets}
        total = sum(t.size for t in targets)
        logits = {t.tensor: torch.full(t.shape, float(self.init_logit), requires_grad=True) for t in targets}
        optimizer = torch.optim.Adam(list(logits.values()), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        history = []
        schedule = batch_indices(len(task), self.steps, self.batch_size, self.seed)
        with progress_bar(len(schedule), f"mask ({task.kind})", "step", enabled=self.progress) as bar:
            for rows in schedule:
                params = {
                    name: weights[name] * sample_hard_mask(logits[name], self.temperature, generator)
                    for name in weights
                }
                task_loss = task.loss(model, params, rows)
                kept = sum(torch.sigmoid(z).sum() for z in logits.values())  # expected kept entries
                loss = task_loss + self.alpha_ * kept
                density = kept.detach() / total
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append({"task_loss": task_loss.item(), "density": density.item()})
                bar.set_postfix(loss=f"{history[-1]['task_loss']:.3f}", density=f"{history[-1]['density']:.3f}")
                bar.update(1)
        return logits, history

    def _summarise(self) -> None:
        kept = {t.tensor: int(self.mask_[t.tensor].sum()) for t in self.targets_}
        self.density_ = sum(kept.values()) / sum(t.size for t in self.targets_)
        by_layer: dict[int, list[int]] = {}
        by_role: dict[str, list[int]] = {}
        for t in self.targets_:
            for table, key in ((by_layer, t.layer), (by_role, t.role)):
                table.setdefault(key, [0, 0])
                table[key][0] += kept[t.tensor]
                table[key][1] += t.size
        self.layer_density_ = {k: a / b for k, (a, b) in sorted(by_layer.items())}
        self.role_density_ = {k: a / b for k, (a, b) in by_role.items()}

    # ---------------------------------------------------------------------------------------- use

    def masked_weights(self, which: str = "mask", seed: int = 0) -> dict[str, torch.Tensor]:
        """The masked weights to substitute: the learned mask, its inverse, or a random mask of the same
        density per tensor (a baseline); "full" substitutes nothing."""
        self.check_fitted()
        if which not in WHICH:
            raise ConfigError(f"which={which!r} is unknown; use one of {', '.join(WHICH)}")
        if which == "full":
            return {}
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for target in self.targets_:
            name, weight = target.tensor, self.model_.get_parameter(target.tensor).detach()
            mask = self.mask_[name]
            if which == "inverted":
                mask = ~mask
            elif which == "random":
                keep = int(mask.sum())
                flat = torch.zeros(mask.numel(), dtype=torch.bool)
                flat[torch.randperm(mask.numel(), generator=generator)[:keep]] = True
                mask = flat.reshape(mask.shape)
            out[name] = weight * mask.to(weight.dtype)
        return out

    def score(self, data: Any, which: str = "mask", *, batch_size: int = 64) -> float:
        """Accuracy (classification) or mean token loss (lm) of the full, masked, inverted or random-mask model."""
        params = self.masked_weights(which)
        with frozen(self.model_), torch_threads(self.threads):
            return self.objective_.score(self.model_, params, data, self.max_length, batch_size)

    def module_tensors(self, base: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """(stored masks, manifest entries) of this mask as a mask module over checkpoint `base`."""
        self.check_fitted()
        if self.granularity == "weight":
            names = {param: checkpoint_name(base, param) for param in self.mask_}
            return ({names[p]: m for p, m in self.mask_.items()},
                    {names[p]: {"mask": names[p], "axis": None} for p in self.mask_})
        masks, entries = {}, {}
        for ffn in self.ffns_:
            masks[neuron_mask_name(ffn.index)] = self.mask_[f"{ffn.down}.weight"].reshape(-1)
            entries.update(neuron_entries(ffn, base))
        return masks, entries

    def save(self, out_dir: str | os.PathLike[str], *, name: str = "task", force: bool = False,
             provenance: dict[str, Any] | None = None, base_ref: Any = None) -> Path:
        """Write the mask as a `mask` module (1 = kept) for the checkpoint it was learned on."""
        self.check_fitted()
        if self.source_ is None:
            raise ConfigError("the mask was learned on a model loaded in memory; fit it on a checkpoint path to save it")
        with open_checkpoint(self.source_) as base:
            masks, entries = self.module_tensors(base)
            return write_mask_module(
                out_dir,
                base,
                masks,
                entries,
                tags={"analysis": "subnetwork", "granularity": self.granularity, "task": name, "ones": "kept"},
                provenance={
                    "params": {k: v for k, v in self.get_params().items() if k not in ("head", "progress", "threads")},
                    "density": self.density_,
                    "layer_density": {str(k): v for k, v in self.layer_density_.items()},
                    "seconds": round(self.seconds_, 2),
                    **(provenance or {}),
                },
                force=force,
                base_ref=base_ref,
            )
