"""Stand-ins of released BLIP folders (`Salesforce/blip-image-captioning-*`, `Salesforce/blip-itm-*-coco`):
the released transformers classes and config fields, 384 px images in 16 px patches, BERT's 30,522-token
vocabulary plus `[DEC]` (bos) and `[ENC]`, the tokenizer and processor files `save_pretrained` writes;
random weights and one thin layer, so that they build in a second."""

from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

BERT_VOCABULARY = 30522
IMAGE_SIZE = 384
WORDS = "a an the of to left right above below picture photo large small red green blue yellow circle square triangle"


def released_tokenizer(folder: Path) -> BertTokenizer:
    """bert-base-uncased's layout ([PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then
    words), 30,522 entries, with BLIP's additions: [DEC] as bos (30522) and [ENC] (30523)."""
    words = WORDS.split()
    filler = [f"tok{index}" for index in range(BERT_VOCABULARY - 104 - len(words))]
    vocabulary = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *filler]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def released_config() -> BlipConfig:
    """The released config fields (vocabulary 30,524, bos [DEC], 384 px) at one thin layer."""
    text = {
        "vocab_size": BERT_VOCABULARY + 2, "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": BERT_VOCABULARY, "pad_token_id": 0, "sep_token_id": 102, "eos_token_id": 102,
    }  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 16}  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def save_released(model_class: type, folder: Path, seed: int = 0) -> Path:
    """A released-layout folder of `model_class` (BlipForConditionalGeneration or BlipForImageTextRetrieval)."""
    torch.manual_seed(seed)
    model = model_class(released_config()).eval()
    with torch.no_grad():  # an untrained model barely looks at the image; make its outputs depend on it
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tokenizer = released_tokenizer(folder)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer=tokenizer
    )
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def released_captioner(folder: Path) -> Path:
    return save_released(BlipForConditionalGeneration, folder)


def released_filter(folder: Path) -> Path:
    return save_released(BlipForImageTextRetrieval, folder)
