import sys
sys.path.insert(0, "/work/main")
from pipelines.training.config import TrainConfig
from pipelines.training.stages import pretrain
from pipelines.manifests.manifest import Generation
from pipelines.stages.evaluate import EvaluateConfig, run_evaluate
seed, gen_no = int(sys.argv[1]), int(sys.argv[2])
cfg = TrainConfig(preset="tiny", max_steps=400, batch_size=32, lr=3e-4, seed=seed, itc_warmup_steps=200,
                  easy_negative_steps=200, cpus_per_worker=2, executor="local", checkpoint_every=400)
gen = Generation("/tmp/demo1/data_manifests", "web", gen_no)
res = pretrain(cfg, gen, f"/tmp/exp/gen{gen_no}-seed{seed}")
print(res)
