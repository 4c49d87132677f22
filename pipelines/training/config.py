"""`TrainConfig`: the settings of one training run, checked when it is made. The training stages and
the loop each Ray Train worker runs both take it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.executor import joins_cluster, resolve_executor
from vlp_core.checkpoint import check_checkpoint
from vlp_core.config import preset_names
from vlp_core.storage import Location, absolute, location

# Where and on how many cores a run executes: never part of what it trains.
PLACEMENT_FIELDS = ("executor", "ray_address", "cpus_per_worker", "child_process")
# Fields that may change when a run is restarted: how long it trains and where it runs.
RESTARTABLE_FIELDS = (
    "epochs",
    "max_steps",
    "num_workers",
    "use_gpu",
    "loader_workers",
    "checkpoint_every",
    "log_every",
    "max_failures",
    *PLACEMENT_FIELDS,
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. BLIP trainings start from `preset` (random weights) or `init_checkpoint`."""

    # the model
    preset: str | None = None  # vlp_core preset, e.g. "tiny"
    init_checkpoint: Location | None = None  # capfilt checkpoint folder or transformers BLIP folder
    tokenizer: Location | None = None  # with `preset`: a tokenizer folder; None trains one on the captions
    clip_model: str = "clip_tiny"  # train_clip: open_clip architecture
    # how long: exactly one of them
    epochs: int | None = None
    max_steps: int | None = None
    # optimisation
    batch_size: int = 32  # per worker
    lr: float = 1e-4  # peak; linear warm-up, then cosine decay to 0
    weight_decay: float = 0.05
    warmup_steps: int = 0  # learning-rate warm-up
    itc_warmup_steps: int = 0  # BLIP tasks: ITC alone first (see training.tasks.Schedule)
    easy_negative_steps: int = 0  # BLIP tasks: ITM negatives ramp from uniform to hard
    seed: int = 0
    # where and how it runs
    executor: str | None = None  # "ray" (Ray Train) or "local"; None: $CAPFILT_EXECUTOR, else "ray"
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    cpus_per_worker: int = 1  # CPU cores (and torch threads) each worker takes
    use_gpu: bool = False  # one GPU per worker; bf16 autocast on CUDA
    loader_workers: int = 0  # DataLoader processes per worker
    checkpoint_every: int = 500  # steps
    log_every: int = 50  # steps
    max_failures: int = 0  # Ray Train restarts after a worker failure (resuming from checkpoints)
    ray_address: str | None = None
    child_process: bool = False  # a run that trains in process: in a child process (two can run side by side)

    def __post_init__(self) -> None:
        object.__setattr__(self, "executor", resolve_executor(self.executor))
        if self.executor == "local":
            _require(self.num_workers == 1, "num_workers", "1 with the local executor (several workers need Ray Train)")
            _require(
                self.max_failures == 0,
                "max_failures",
                "0 with the local executor (Ray Train restarts failed workers; a local run resumes when re-run)",
            )
        for name in ("batch_size", "num_workers", "cpus_per_worker", "checkpoint_every", "log_every"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer ≥ 1")
        for name in (
            "warmup_steps",
            "itc_warmup_steps",
            "easy_negative_steps",
            "seed",
            "loader_workers",
            "max_failures",
        ):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer ≥ 0")
        _require(isinstance(self.child_process, bool), "child_process", "True or False")
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(
                f"TrainConfig: give either epochs or max_steps, not both or neither "
                f"(got epochs={self.epochs!r}, max_steps={self.max_steps!r})"
            )
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 1), name, "None or an integer ≥ 1")
        _require(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "lr", "a number in (0, 1)")
        _require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay", "≥ 0")
        _require(
            self.preset is None or self.init_checkpoint is None,
            "preset",
            "None when init_checkpoint is set (start from one or the other)",
        )
        _require(self.preset is None or self.preset in preset_names(), "preset", f"one of {preset_names()}")
        _require(
            self.tokenizer is None or self.preset is not None,
            "tokenizer",
            "None unless preset is set (a checkpoint brings its own tokenizer)",
        )
        for name in ("init_checkpoint", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, absolute(location(value)))
                _require(getattr(self, name).is_dir(), name, f"an existing folder (got {value})")
        if self.init_checkpoint is not None:
            check_checkpoint(self.init_checkpoint)  # a bad checkpoint stops here, before any work

    @property
    def trains_in_process(self) -> bool:
        """Whether the run trains in this process or its child, not on Ray Train (see `trains_in_process`)."""
        return trains_in_process(self.executor, self.num_workers, self.max_failures, self.ray_address)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Location) else v for k, v in dataclasses.asdict(self).items()}

    def placement_free_dict(self) -> dict:
        """`to_dict` without where the run executes: the same run on Ray or in this process."""
        return {k: v for k, v in self.to_dict().items() if k not in PLACEMENT_FIELDS}


def trains_in_process(
    executor: str, num_workers: int = 1, max_failures: int = 0, ray_address: str | None = None
) -> bool:
    """Whether a training trains in this process: with the local executor, and under Ray when Ray Train
    would add nothing but its start-up (~25 s): one worker, no restarts, no cluster to join."""
    if executor == "local":
        return True
    return num_workers == 1 and max_failures == 0 and not joins_cluster(ray_address)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, name: str, expected: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig.{name} must be {expected}")
