"""Stand-ins of released captioner folders: BLIP-2 (OPT), InstructBLIP (Vicuna/Llama), LLaVA-1.5 (Llama, CLIP
vision tower, chat template) as transformers' `save_pretrained` writes them, and CoCa in open_clip's released
layout (`open_clip_config.json`, `open_clip_model.safetensors`). The released classes and config fields at
one thin layer and 64 px, a small byte-level BPE vocabulary, random weights; each builds in about a second."""

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    CLIPImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE, PATCH = 64, 16
QUERY_TOKENS = 4
WORDS = (
    "a an the of to in on with one picture photo image large small red green blue yellow circle square triangle "
    "left right above below describe short description sentence"
)
# LLaVA-1.5's template, shortened: "USER: <image>\n{prompt} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": IMAGE_SIZE, "patch_size": PATCH}  # fmt: skip
QFORMER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "encoder_hidden_size": 32}  # fmt: skip


def bpe_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / OPT style) learned on a few words: <pad> 0, <unk> 1, <s> 2, </s> 3."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([WORDS] * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def language_model(model_type: str, vocab_size: int) -> dict:
    """A one-layer decoder-only language model config of `model_type` ("opt" or "llama")."""
    common = {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 2,
              "eos_token_id": 3}  # fmt: skip
    if model_type == "opt":
        return {**common, "ffn_dim": 64, "word_embed_proj_dim": 32}
    return {**common, "intermediate_size": 64, "num_key_value_heads": 2}


def _save(model: torch.nn.Module, processor, folder: Path, seed: int) -> Path:
    """Perturb the random weights (an untrained model barely looks at the image), then save both."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    model.eval().save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def _blip_image_processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def blip2_folder(folder: Path, seed: int = 0) -> Path:
    """Salesforce/blip2-opt-* layout: the processor adds `<image>` and prefixes the query placeholders."""
    processor = Blip2Processor(_blip_image_processor(), bpe_tokenizer(), num_query_tokens=QUERY_TOKENS)
    return _query_former_folder(Blip2Config, Blip2ForConditionalGeneration, processor, "opt", 64, folder, seed)


def instructblip_folder(folder: Path, seed: int = 0) -> Path:
    """Salesforce/instructblip-vicuna-* layout: a Llama language model and a BERT tokenizer for the Q-Former."""
    vocabulary = folder.parent / f"{folder.name}-qformer-vocab.txt"
    vocabulary.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]) + "\n")
    processor = InstructBlipProcessor(
        _blip_image_processor(), bpe_tokenizer(), BertTokenizerFast(str(vocabulary)), num_query_tokens=QUERY_TOKENS
    )
    vocabulary_size = len(processor.qformer_tokenizer)
    model_class = InstructBlipForConditionalGeneration
    return _query_former_folder(InstructBlipConfig, model_class, processor, "llama", vocabulary_size, folder, seed)


def _query_former_folder(
    config_class: type, model_class: type, processor, language: str, qformer_vocabulary: int, folder: Path, seed: int
) -> Path:
    """A BLIP-2-family model (vision tower, Q-Former, `language` model) sized to `processor`'s tokenizer."""
    tokenizer = processor.tokenizer
    config = config_class(
        vision_config=VISION,
        qformer_config={**QFORMER, "vocab_size": qformer_vocabulary},
        text_config=language_model(language, len(tokenizer)),
        num_query_tokens=QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(model_class(config), processor, folder, seed)


def llava_folder(folder: Path, seed: int = 0) -> Path:
    """llava-hf/llava-1.5-* layout: a CLIP vision tower (features of its second-to-last layer, CLS dropped),
    a Llama language model, and a chat template in the processor."""
    tokenizer = bpe_tokenizer(("<image>",))
    processor = LlavaProcessor(
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config={**VISION, "model_type": "clip_vision_model", "num_hidden_layers": 2, "projection_dim": 16},
        text_config=language_model("llama", len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config), processor, folder, seed)


COCA_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 1,
        "width": 32,
        "head_width": 16,
        "patch_size": PATCH,
        "attentional_pool": True,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 76,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "attn_pooler_heads": 2,
    },
    "custom_text": True,
}  # fmt: skip  (coca_ViT-B-32's fields, one thin layer)


def coca_folder(folder: Path, seed: int = 0) -> Path:
    """laion/CoCa-* layout: open_clip_config.json (model_cfg, preprocess_cfg) and the weights."""
    torch.manual_seed(seed)
    model = open_clip.CoCa(**{key: value for key, value in COCA_CONFIG.items() if key != "custom_text"})
    with torch.no_grad():  # open_clip 3.3 leaves the decoder's projection as torch.empty memory (NaN at times)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=COCA_CONFIG["multimodal_cfg"]["width"] ** -0.5)
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": COCA_CONFIG, "preprocess_cfg": preprocess}))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


RELEASED_CAPTIONERS = {"blip2": blip2_folder, "instructblip": instructblip_folder, "llava": llava_folder,
                       "coca": coca_folder}  # fmt: skip
