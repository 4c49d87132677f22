"""The work `capfilt bench revision` times in each tree: run as the source of `python -c`, with one tree of
capfilt on PYTHONPATH, so it uses only what vlp_core has had since 3fab4bf, the code #16 measured (the base
preset, generate with seeds, score_captions, BlipPretrainer). Its argument is JSON {"preset", "repeats"}; it
prints one JSON line {work: {"label", "unit", "count", "seconds": [per timed call]}} after one untimed call of
each work.

The model has random weights and BERT's 30,524-token vocabulary at the base preset (a tokenizer of world
words padded with filler tokens), seed 0: both trees build the same model, so they do the same arithmetic.
"""

import json
import sys
import time

import torch

from vlp_core.blip import BlipModel
from vlp_core.config import load_preset
from vlp_core.generation import generate
from vlp_core.pretrain import BlipPretrainer, configure_optimizer, prompt_length
from vlp_core.scoring import score_captions
from vlp_core.tokenizer import special_ids, tokenize, train_tokenizer

IMAGES, CAPTIONS_PER_IMAGE, CANDIDATES, TRAIN_BATCH = 4, 5, 6, 8
WORDS = "red green blue small large circle square triangle left right top bottom of a the and on in near".split()

settings = json.loads(sys.argv[1])
torch.manual_seed(0)
config = load_preset(settings["preset"])
draws = torch.Generator().manual_seed(0)
corpus = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=draws).tolist()) for _ in range(500)]
tokenizer = train_tokenizer(corpus, vocab_size=config.text.vocab_size)
tokenizer.add_tokens([f"filler{index}" for index in range(config.text.vocab_size - len(tokenizer))])
model = BlipModel(config)
size = config.vision.image_size
pixels = torch.randn(TRAIN_BATCH, 3, size, size, generator=draws)
candidates = [
    [corpus[(image * CANDIDATES + k) % len(corpus)] for k in range(CANDIDATES)] for image in range(TRAIN_BATCH)
]
trainee = BlipPretrainer(model, special_ids(tokenizer), prompt_length(tokenizer, config.prompt))
optimizer = configure_optimizer(trainee, lr=1e-5, weight_decay=0.05)
input_ids, attention_mask = tokenize(
    tokenizer, [config.prompt + text for text in corpus[:TRAIN_BATCH]], config.max_text_length
)


def caption() -> None:
    model.eval()
    generate(model, tokenizer, pixels[:IMAGES], num_captions=CAPTIONS_PER_IMAGE, max_length=20, seeds=range(IMAGES))


def score() -> None:
    model.eval()
    score_captions(model, tokenizer, pixels, candidates)


def train_step() -> None:
    trainee.train()
    loss = trainee(pixels, input_ids, attention_mask, torch.arange(TRAIN_BATCH), alpha=0.4)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


WORKS = {
    "caption": (f"{IMAGES} images x {CAPTIONS_PER_IMAGE} captions", "images/s", IMAGES, caption),
    "score": (f"{TRAIN_BATCH} images x {CANDIDATES} candidates", "images/s", TRAIN_BATCH, score),
    "train_step": (f"pretraining step, batch {TRAIN_BATCH}", "samples/s", TRAIN_BATCH, train_step),
}
timings = {}
for name, (label, unit, count, work) in WORKS.items():
    work()
    seconds = []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    timings[name] = {"label": f"{name}: {label}", "unit": unit, "count": count, "seconds": seconds}
print(json.dumps(timings))
