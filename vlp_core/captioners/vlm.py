"""transformers' vision-language models as captioners: BLIP-2, InstructBLIP and LLaVA, from local folders as
`save_pretrained` writes them (the model and its processor).

transformers' `generate` runs the model (its KV cache, its length rules and repetition penalty); the
token at each step is drawn by `SeededNucleus`, a logits processor that applies capfilt's nucleus rule
with each row's own draw and leaves only the chosen token possible. So sampling means what it means in
every other backend, and an image's captions depend on its seed, not on its batch.

The prompt is tokenized once, with a blank image, by the folder's processor (which inserts the image
placeholder tokens its model expects); LLaVA's prompt is the user's turn of the processor's chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BaseImageProcessor,
    Blip2ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)

from vlp_core.captioners.base import Sampling
from vlp_core.checkpoint import CheckpointError, file_digest, require_finite
from vlp_core.generation import RowDraws, nucleus_sample, row_draws
from vlp_core.inference import inference_mode

WEIGHTS_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # what save_pretrained writes, sharded or not


@dataclass(frozen=True)
class VlmKind:
    """One transformers model class: the backend name, what its config.json says, its default prompt."""

    backend: str
    model_class: type[PreTrainedModel]
    model_type: str  # config.json's model_type
    default_prompt: str | None
    chat: bool = False  # the prompt is a user turn of the processor's chat template


KINDS = {
    kind.backend: kind
    for kind in (
        VlmKind("blip2", Blip2ForConditionalGeneration, "blip-2", None),
        VlmKind("instructblip", InstructBlipForConditionalGeneration, "instructblip", "A short image description:"),
        VlmKind("llava", LlavaForConditionalGeneration, "llava", "Describe the image in one sentence.", chat=True),
    )
}


@dataclass(frozen=True)
class ProcessorTransform:
    """An image -> (3, S, S) pixel values, as a folder's image processor makes them."""

    image_processor: BaseImageProcessor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class SeededNucleus(LogitsProcessor):
    """Nucleus sampling inside transformers' `generate`: each of the B rows draws its token with its own
    uniform (`draws`, one call per step), and every other token becomes impossible, so `generate`'s own
    sampling can only take it. Ids at or past `vocab_limit` (not in the tokenizer) are never drawn."""

    def __init__(self, top_p: float, temperature: float, draws: RowDraws, vocab_limit: int) -> None:
        self.top_p, self.temperature, self.draws, self.vocab_limit = top_p, temperature, draws, vocab_limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """(B, T) ids so far, (B, V) scores -> (B, V) scores: 0 for the drawn token, -inf elsewhere."""
        logits = scores[:, : self.vocab_limit].float() / self.temperature
        tokens = nucleus_sample(logits.softmax(dim=-1), self.top_p, self.draws())
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.unsqueeze(1), 0.0)


def weights_files(folder: Path) -> list[Path]:
    """The folder's weights files, sorted; CheckpointError when there are none."""
    files = sorted({path for pattern in WEIGHTS_PATTERNS for path in folder.glob(pattern)})
    if not files:
        raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHTS_PATTERNS)}); save the model there first")
    return files


class VlmCaptioner:
    """A BLIP-2, InstructBLIP or LLaVA folder loaded for captioning."""

    def __init__(self, kind: VlmKind, checkpoint: Path, device: str | torch.device = "cpu", prompt: str | None = None):
        self.check_folder(kind, checkpoint)
        self.backend = kind.backend
        self.model_ref = self.digest(checkpoint)
        self.processor = AutoProcessor.from_pretrained(str(checkpoint))
        self.tokenizer = self.processor.tokenizer
        self.transform = ProcessorTransform(self.processor.image_processor)
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = kind.model_class.from_pretrained(str(checkpoint), dtype=dtype).to(device).eval()
        require_finite(self.model.state_dict().items(), checkpoint)
        self.prompt = kind.default_prompt if prompt is None else prompt
        self.prompt_inputs = self._prompt_inputs(kind)

    @staticmethod
    def digest(checkpoint: Path) -> str:
        return file_digest(*weights_files(Path(checkpoint)))

    @staticmethod
    def load_transform(checkpoint: Path) -> ProcessorTransform:
        return ProcessorTransform(AutoProcessor.from_pretrained(str(checkpoint)).image_processor)

    @staticmethod
    def check_folder(kind: VlmKind, checkpoint: Path) -> None:
        """CheckpointError unless `checkpoint` is a folder of `kind`'s model with weights and a processor."""
        folder = Path(checkpoint)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} is not a transformers model folder: config.json is missing")
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: not a JSON object ({error})") from error
        if model_type != kind.model_type:
            known = {other.model_type: other.backend for other in KINDS.values()}
            hint = f"use --backend {known[model_type]}" if model_type in known else "give a folder of that model"
            raise CheckpointError(
                f"{folder} holds a {model_type!r} model, but the {kind.backend} backend reads {kind.model_type!r} "
                f"({kind.model_class.__name__}); {hint}"
            )
        weights_files(folder)
        if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
            raise CheckpointError(f"{folder}: no processor; save the model's processor there too (save_pretrained)")

    def _prompt_inputs(self, kind: VlmKind) -> dict[str, torch.Tensor]:
        """The processor's text inputs for one image (input ids with the image placeholders, masks): (1, T)."""
        text = self.prompt or ""
        if kind.chat:
            if self.processor.chat_template is None:
                raise CheckpointError(f"{kind.backend}: the processor has no chat template to put the prompt in")
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        inputs = self.processor(images=Image.new("RGB", (64, 64)), text=text, return_tensors="pt")
        return {name: value for name, value in inputs.items() if name != "pixel_values"}

    def model_inputs(self, pixels: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """`generate`'s inputs for N images (N, 3, S, S) on `device`: the prompt's, once per image, the pixels,
        and the pad id."""
        pad = self.tokenizer.pad_token_id
        return {
            **{name: value.to(device).expand(len(pixels), -1) for name, value in self.prompt_inputs.items()},
            "pixel_values": pixels.to(device, self.model.dtype),
            "pad_token_id": self.tokenizer.eos_token_id if pad is None else pad,
        }

    def new_tokens(self, output: torch.Tensor) -> torch.Tensor:
        """`generate`'s output without the prompt a decoder-only language model repeats."""
        if self.model.config.get_text_config().is_encoder_decoder:
            return output
        return output[:, self.prompt_inputs["input_ids"].shape[1] :]

    def caption(self, pixels: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> list[list[str]]:
        count, copies = len(pixels), sampling.num_captions
        if count == 0:
            return []
        with inference_mode(self.model) as device:
            draws = row_draws(count, copies, sampling.max_length, seeds=seeds, device=device)
            output = self.model.generate(
                **self.model_inputs(pixels, device),
                do_sample=True,
                num_beams=1,
                num_return_sequences=copies,
                max_new_tokens=sampling.max_length,
                min_new_tokens=sampling.min_length,
                repetition_penalty=sampling.repetition_penalty,
                logits_processor=LogitsProcessorList(
                    [SeededNucleus(sampling.top_p, sampling.temperature, draws, len(self.tokenizer))]
                ),
            )
        texts = [
            text.strip() for text in self.tokenizer.batch_decode(self.new_tokens(output), skip_special_tokens=True)
        ]
        return [texts[start : start + copies] for start in range(0, len(texts), copies)]
