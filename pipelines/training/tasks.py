"""What each training task trains: the module, its per-step losses, its data transform and its export.

A *trainee* is an `nn.Module` with `forward(batch, step) -> {"loss": ..., <named terms>}` and
`export(directory) -> digest`. Its `state_dict` holds everything a resume needs besides the optimizer
(BLIP's momentum encoders, feature queues and ITM sampling generator included).

Tasks: `pretrain` (ITC + ITM + LM; captions without a prompt, as in BLIP), `captioner` (LM, captions
prefixed with the model's prompt), `filter` (ITC + ITM) — all on a BLIP model — and `clip` (open_clip
contrastive loss on the ranker).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase

from pipelines.training.data import collate_captions
from vlp_core.atomic import atomic_write_json
from vlp_core.blip import BlipModel
from vlp_core.checkpoint import OBJECTIVE_PARTS, PARTS, checkpoint_parts, file_digest, load_checkpoint, save_checkpoint
from vlp_core.clip import ClipRanker, load_clip, save_clip
from vlp_core.config import CAPTION_PROMPT, load_preset
from vlp_core.data import CaptionCollator, image_transform
from vlp_core.momentum import alpha_ramp
from vlp_core.pretrain import CAPTIONER, FILTER, PRETRAIN, BlipPretrainer, prompt_length
from vlp_core.storage import Location, location
from vlp_core.tokenizer import load_tokenizer, special_ids

BLIP_OBJECTIVES = {"pretrain": PRETRAIN, "captioner": CAPTIONER, "filter": FILTER}
TASKS = (*BLIP_OBJECTIVES, "clip")
CLIP_WEIGHTS_FILE = "clip.safetensors"
CLIP_CONFIG_FILE = "clip.json"


@dataclass(frozen=True)
class Schedule:
    """How a BLIP training's step depends on its number.

    steps_per_epoch:     the distillation alpha ramps up over the first epoch (BLIP)
    itc_warmup_steps:    the first steps train ITC alone; from scratch, the LM and ITM gradients on the
                         shared text layers drown the contrastive signal while the features are still alike
    easy_negative_steps: ITM negatives go from uniform to ITC-hard over these steps (after the warm-up)
    """

    steps_per_epoch: int
    itc_warmup_steps: int = 0
    easy_negative_steps: int = 0

    def objectives(self, step: int, objectives: tuple[str, ...]) -> tuple[str, ...]:
        return ("itc",) if step < self.itc_warmup_steps and "itc" in objectives else objectives

    def hardness(self, step: int) -> float:
        if self.easy_negative_steps == 0:
            return 1.0
        return min(1.0, max(0, step - self.itc_warmup_steps) / self.easy_negative_steps)


class BlipTrainee(nn.Module):
    """A `BlipPretrainer` plus what a step needs besides the batch: its `Schedule` and the generator
    that samples ITM negatives."""

    def __init__(
        self,
        pretrainer: BlipPretrainer,
        tokenizer: PreTrainedTokenizerBase,
        schedule: Schedule,
        generator: torch.Generator,
        parts: dict[str, str] | None,
    ) -> None:
        super().__init__()
        self.pretrainer = pretrainer
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.generator = generator
        self.parts = parts  # what the exported checkpoint holds (vlp_core.checkpoint.PARTS); None: unknown

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """batch: pixel_values (B, 3, S, S), input_ids / attention_mask (B, L), image_index (B,)."""
        schedule = self.schedule
        alpha = alpha_ramp(step, schedule.steps_per_epoch, self.pretrainer.model.config.alpha)
        return self.pretrainer(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["image_index"],
            alpha,
            self.generator,
            hardness=schedule.hardness(step),
            objectives=schedule.objectives(step, self.pretrainer.objectives),
        )

    def export(self, directory: Location) -> str:
        """A capfilt checkpoint folder (`vlp_core.checkpoint.load_checkpoint` reads it); returns its digest."""
        return save_checkpoint(self.pretrainer.model, self.tokenizer, directory, self.parts)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"itm_generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["itm_generator"].cpu())  # RNG states live on the CPU


class ClipTrainee(nn.Module):
    """An open_clip ranker in training mode; `model` is registered so DDP and the optimizer see it."""

    def __init__(self, ranker: ClipRanker) -> None:
        super().__init__()
        self.model = ranker.model.train()
        self.ranker = ranker

    def forward(self, batch: dict[str, torch.Tensor | list[str]], step: int) -> dict[str, torch.Tensor]:
        """batch: pixel_values (B, 3, S, S), captions (B strings)."""
        losses = self.ranker.contrastive_loss(batch["pixel_values"], batch["captions"])
        return {**losses, "loss": losses["contrastive_loss"]}

    def export(self, directory: Location) -> str:
        """`clip.safetensors` + `clip.json` (architecture name and digest, written last); returns the digest."""
        save_clip(self.ranker, directory / CLIP_WEIGHTS_FILE)
        digest = file_digest(directory / CLIP_WEIGHTS_FILE)
        atomic_write_json(directory / CLIP_CONFIG_FILE, {"model_name": self.ranker.model_name, "digest": digest})
        return digest


def load_clip_checkpoint(directory: Location, device: str | torch.device = "cpu") -> tuple[ClipRanker, str]:
    """The ranker exported by a `clip` training run (its `final/` folder, local or remote) and its digest."""
    directory = location(directory)
    config_path = directory / CLIP_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a trained CLIP folder: {CLIP_CONFIG_FILE} is missing")
    header = json.loads(config_path.read_text())
    weights = directory / CLIP_WEIGHTS_FILE
    digest = file_digest(weights)
    if digest != header["digest"]:
        raise ValueError(f"{weights} has digest {digest}, but {config_path} records {header['digest']}")
    return load_clip(header["model_name"], weights, device), digest


def _caption_prefix(task: str, checkpoint_prompt: str) -> str:
    """What `task` puts before each caption: a captioner its checkpoint's prompt, or BLIP's when it starts
    from a pretrained decoder (which learnt captions without one); pretraining and the filter nothing."""
    return (checkpoint_prompt or CAPTION_PROMPT) if task == "captioner" else ""


@dataclass
class Task:
    """Everything task-specific the training loop needs."""

    trainee: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    collate: Callable[[list], dict]
    caption_prefix: str  # prepended to every caption (the captioner's prompt)
    find_unused_parameters: bool  # DDP: some parameters get no gradient under this objective


def build_task(
    task: str,
    *,
    preset: str | None,
    init_checkpoint: Location | None,
    tokenizer_dir: Location | None,
    clip_model: str,
    schedule: Schedule,
    seed: int,
    device: torch.device,
) -> Task:
    """The trainee of `task` on `device`, from a preset (random weights, the call site seeds torch) or a checkpoint."""
    if task == "clip":
        ranker = load_clip(clip_model, device=device)
        return Task(ClipTrainee(ranker), ranker.preprocess, collate_captions, "", False)
    if init_checkpoint is not None:
        model, tokenizer, _ = load_checkpoint(init_checkpoint)
        parts = checkpoint_parts(init_checkpoint)
    else:
        model, tokenizer = BlipModel(load_preset(preset)), load_tokenizer(tokenizer_dir)
        parts = dict.fromkeys(PARTS, "random")
    objectives = BLIP_OBJECTIVES[task]
    prompt = _caption_prefix(task, model.config.prompt)
    if "lm" in objectives:  # the checkpoint records the prefix its decoder learnt captions after
        model.config = dataclasses.replace(model.config, prompt=prompt)
    if parts is not None:
        parts |= {part: "trained" for objective in objectives for part in OBJECTIVE_PARTS[objective]}
    pretrainer = BlipPretrainer(model, special_ids(tokenizer), prompt_length(tokenizer, prompt), objectives)
    generator = torch.Generator(device=device).manual_seed(seed)
    return Task(
        trainee=BlipTrainee(pretrainer, tokenizer, schedule, generator, parts).to(device),
        transform=image_transform(model.config, train=True),
        collate=CaptionCollator(tokenizer, model.config.max_text_length),
        caption_prefix=prompt,
        find_unused_parameters=objectives != PRETRAIN or schedule.itc_warmup_steps > 0,
    )
