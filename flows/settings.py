"""A bootstrapping run's settings: every knob (`RunSettings`, checked before any work) and the presets that
fill them (`RUN_PRESETS`: the README demo, and the smoke run of the tests)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.executor import resolve_executor
from pipelines.stages import filter as filtering
from pipelines.stages.shards import check_config
from pipelines.world.generate import WorldConfig
from vlp_core.captioners import BACKENDS, check_captioner
from vlp_core.checkpoint import FILTER_NEEDS, check_checkpoint
from vlp_core.storage import Location, location


@dataclass(frozen=True)
class RunSettings:
    """Every knob of one bootstrapping run (a preset fills them; flow parameters override some)."""

    model_preset: str = "tiny"
    rounds: int = 1
    # tiny: seeds ± 0.15 TR@1 apart at 400 steps, ± 0.08 at 450, ± 0.05 at 600 (docs/ablation-tiny-1000.md)
    pretrain_steps: int = 600
    itc_warmup_steps: int = 0  # pretraining from scratch: ITC alone first (tiny's stem and text init need none)
    easy_negative_steps: int = 200  # pretraining: ITM negatives ramp from uniform to hard (fine-tuning: hard)
    # fine-tuning the captioner and the filter from the pretrained model (the filter: hard ITM negatives); on
    # one machine they train side by side, so the captioner's extra steps cost little (docs/architecture.md)
    captioner_steps: int = 1000
    filter_steps: int = 450
    finetune_lr: float = 1e-3  # measured on the tiny world: 150 steps at 3e-4 leave captions and ITM poor
    clip_steps: int = 150
    batch_size: int = 32
    lr: float = 3e-4
    train_cpus: int = 2  # cores of a training that runs alone; side-by-side ones share them
    # BLIP's one synthetic caption per image: the tiny CLIP ranks one image's captions at chance, so of five
    # its top-k would keep a random two and drop half the clean web captions (docs/architecture.md)
    num_captions: int = 1
    filter_scorer: str = "itm"  # itm: the BLIP filter's ITM head; clip: the CLIP ranker's cosine similarity
    itm_threshold: float = 0.5  # the itm scorer's: an ITM match probability
    # each image keeps only its best-scored caption of those the filter passes (0: all of them, BLIP's): on
    # the tiny world captioner + filter then leads filter only, where keeping both trails it (architecture.md)
    best_per_image: int = 1
    clip_threshold: float = 0.28  # the clip scorer's: a cosine similarity (DataComp's CLIP-score cut for ViT-L/14)
    top_k: int = 2
    k_test: int = 8  # evaluation: ITC candidates re-ranked by ITM per query
    clip_model: str = "clip_tiny"
    clip_checkpoint: Location | None = None  # a trained open_clip state dict; None trains clip_model here
    # released models (a capfilt checkpoint or a transformers BLIP folder); None fine-tunes one each round.
    # Both given (or a captioner and the clip scorer): one round that trains nothing (caption, filter, rank,
    # assemble generation 1).
    captioner_checkpoint: Location | None = None
    captioner_backend: str = "blip"  # the captioner_checkpoint's backend (vlp_core.captioners); blip is fine-tuned
    caption_prompt: str | None = None  # None: the captioner backend's default
    filter_checkpoint: Location | None = None
    inference_batch_size: int | None = None  # images per model call; None: 32 on a CPU, 256 on a GPU
    concurrency: int = 1  # Ray actors (caption, filter, rank) and evaluation tasks; one runs in this process
    num_gpus: float = 0.0
    executor: str | None = None  # "ray" or "local" (pipelines.executor); None: $CAPFILT_EXECUTOR, else ray
    ray_address: str | None = None
    seed: int = 0
    world: WorldConfig = WorldConfig(n_web=2000, n_human=500, n_test=100)  # made when no url_list is given
    # an ablation's held-out images in a made world (None: the world's): its arms differ by a few points, which
    # 100 images resolve poorly (1 point an image; no CapFilt's TR@1 0.92 left captioner + filter 8 points)
    ablation_n_test: int | None = 500

    def __post_init__(self) -> None:
        """Fail before any work, naming the setting to fix."""
        object.__setattr__(self, "executor", resolve_executor(self.executor))
        for name in ("clip_checkpoint", "captioner_checkpoint", "filter_checkpoint"):
            if getattr(self, name) is not None:  # a flow parameter arrives as a string
                object.__setattr__(self, name, location(getattr(self, name)))
        check_config(
            type(self).__name__,
            [
                (
                    self.captioner_backend in BACKENDS,
                    f"captioner_backend must be one of {', '.join(BACKENDS)}, got {self.captioner_backend!r}",
                ),
                (
                    self.captioner_backend == "blip" or self.captioner_checkpoint is not None,
                    f"a {self.captioner_backend} captioner is not fine-tuned here; give captioner_checkpoint",
                ),
                (
                    self.filter_scorer in filtering.SCORERS,
                    f"filter_scorer must be one of {', '.join(filtering.SCORERS)}, got {self.filter_scorer!r}",
                ),
                (
                    self.filter_scorer == "itm" or self.filter_checkpoint is None,
                    "filter_checkpoint is the itm scorer's model; the clip scorer uses the CLIP ranker",
                ),
            ],
        )
        if self.captioner_checkpoint is not None:  # a bad or wrong model stops the flow before any work
            check_captioner(self.captioner_backend, self.captioner_checkpoint)
        if self.filter_checkpoint is not None:
            check_checkpoint(self.filter_checkpoint, FILTER_NEEDS, "the filter")
        at_least = {
            "rounds": 0,
            "itc_warmup_steps": 0,
            "easy_negative_steps": 0,
            "pretrain_steps": 1,
            "captioner_steps": 1,
            "filter_steps": 1,
            "clip_steps": 1,
            "batch_size": 1,
            "train_cpus": 1,
            "num_captions": 1,
            "top_k": 1,
            "best_per_image": 0,
            "k_test": 1,
            "concurrency": 1,
        }
        if self.inference_batch_size is not None:  # None: the device's default
            at_least["inference_batch_size"] = 1
        integers = {name: (getattr(self, name), low) for name, low in at_least.items()}
        check_config(
            type(self).__name__,
            [
                *(
                    (
                        isinstance(value, int) and not isinstance(value, bool) and value >= low,
                        f"{name} must be an integer ≥ {low}, got {value!r}",
                    )
                    for name, (value, low) in integers.items()
                ),
                (
                    0.0 <= self.itm_threshold <= 1.0,
                    f"itm_threshold must be a probability in [0, 1], got {self.itm_threshold!r}",
                ),
                (
                    -1.0 <= self.clip_threshold <= 1.0,
                    f"clip_threshold must be a cosine similarity in [-1, 1], got {self.clip_threshold!r}",
                ),
                (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
                (self.finetune_lr > 0, f"finetune_lr must be > 0, got {self.finetune_lr!r}"),
                (self.num_gpus >= 0, f"num_gpus must be ≥ 0, got {self.num_gpus!r}"),
                (
                    not self.trains_nothing or self.rounds == 1,
                    f"with a given captioner and filter the flow runs one round; rounds must be 1, got {self.rounds}",
                ),
            ],
        )

    @property
    def trains_nothing(self) -> bool:
        """The captioner is given and so is the filter (or the clip scorer needs none): no BLIP model is trained."""
        return self.captioner_checkpoint is not None and (
            self.filter_checkpoint is not None or self.filter_scorer == "clip"
        )

    @property
    def thresholds(self) -> dict[str, float]:
        """Each filter scorer's threshold."""
        return {"itm": self.itm_threshold, "clip": self.clip_threshold}


RUN_PRESETS = {
    "tiny": RunSettings(),  # the README demo
    "smoke": RunSettings(  # every stage, minimal work: for tests of the flow and its deployments
        pretrain_steps=10,
        itc_warmup_steps=4,
        easy_negative_steps=4,
        captioner_steps=5,
        filter_steps=5,
        clip_steps=5,
        batch_size=8,
        num_captions=2,
        best_per_image=0,  # the flow tests count what the threshold keeps
        ablation_n_test=16,
        inference_batch_size=8,
        train_cpus=1,
        world=WorldConfig(n_web=60, n_human=24, n_test=12, captions_per_image=2),
    ),
}
