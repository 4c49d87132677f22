"""Capacity probe: train a tiny BLIP captioner (and/or filter) from scratch on the human set; measure held-out
greedy caption attribute accuracy. Usage: probe.py NAME STEPS LR [key=value ...]"""
import json, sys, time, math, random
from dataclasses import replace
import numpy as np, torch
from torch import nn
from PIL import Image
sys.path.insert(0, "/work/main")
from vlp_core.config import load_preset, BlipConfig
from vlp_core.blip import BlipModel
from vlp_core.pretrain import BlipPretrainer, CAPTIONER, FILTER, PRETRAIN, prompt_length, configure_optimizer
from vlp_core.tokenizer import load_tokenizer, special_ids, tokenize
from vlp_core.data import image_transform, CaptionCollator
from vlp_core.generation import generate
from pipelines.world.generate import WorldPaths, load_scenes
from pipelines.world.grammar import attribute_accuracy

torch.set_num_threads(2)
name, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
opts = dict(a.split("=", 1) for a in sys.argv[4:])
world = WorldPaths.at("/tmp/demo0/world")
tok = load_tokenizer(next(__import__("pathlib").Path("/tmp/demo0/train").glob("pretrain-*/tokenizer")))
cfg = load_preset("tiny")
vis = cfg.vision
for k in ("patch_size", "hidden_size", "num_layers", "intermediate_size", "num_heads"):
    if "v_" + k in opts:
        vis = replace(vis, **{k: int(opts["v_" + k])})
txt = cfg.text
for k in ('num_layers', 'hidden_size', 'intermediate_size'):
    if 't_' + k in opts: txt = replace(txt, **{k: int(opts['t_' + k])})
if 't_init' in opts: txt = replace(txt, initializer_range=float(opts['t_init']))
cfg = replace(cfg, vision=vis, text=txt, label_smoothing=float(opts.get('ls', 0.1)))
torch.manual_seed(int(opts.get("seed", 0)))
model = BlipModel(cfg)

class LN2d(nn.Module):
    def __init__(self, c):
        super().__init__(); self.ln = nn.LayerNorm(c)
    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class ConvStem(nn.Module):
    def __init__(self, width, patch):
        super().__init__()
        layers, c = [], 3
        chans = {8: [24, 48, width], 16: [16, 32, 64, width], 4: [32, width]}[patch]
        for i, o in enumerate(chans):
            layers += [nn.Conv2d(c, o, 3, 2, 1), (nn.BatchNorm2d(o) if opts.get("bn", "1") == "1" else nn.GroupNorm(4, o) if opts.get("bn") == "gn" else LN2d(o) if opts.get("bn") == "ln" else nn.Identity()), nn.GELU()]
            c = o
        layers[-1:] = []  # no act at end
        layers += [nn.Conv2d(width, width, 1)]
        self.net = nn.Sequential(*layers)
    @property
    def weight(self):
        return self.net[-1].weight
    def forward(self, x):
        return self.net(x)

if opts.get("stem") == "conv":
    model.vision_model.embeddings.patch_embedding = ConvStem(vis.hidden_size, vis.patch_size)

mode = opts.get("mode", "cap")
objectives = {"cap": CAPTIONER, "filt": FILTER, "all": PRETRAIN, "itc": ("itc",), "pre": PRETRAIN, "lmfirst": PRETRAIN}[mode]
prompt = cfg.prompt if mode == "cap" else ""
itc_warm = int(opts.get("itcwarm", 200))
pre = BlipPretrainer(model, special_ids(tok), prompt_length(tok, prompt), objectives)
train_tf = image_transform(cfg, train=opts.get("aug", "1") == "1")
test_tf = image_transform(cfg, train=False)
ann = json.load(open(world.human_annotations))
imgs = [Image.open(world.human_root / a["image"]).convert("RGB") for a in ann]
human_ann, human_imgs = ann, imgs
if opts.get("data") == "web":
    import pyarrow.parquet as pq0
    web = [p for p in pq0.read_table(world.web_pairs).to_pylist() if (world.web_images / (p["key"] + ".jpg")).exists() and p["caption"]]
    ann = [{"caption": [p["caption"]], "image_id": p["key"]} for p in web]
    imgs = []
    for p in web:
        try:
            imgs.append(Image.open(world.web_images / (p["key"] + ".jpg")).convert("RGB"))
        except Exception:
            imgs.append(None)
    keep = [i for i, im in enumerate(imgs) if im is not None]
    ann = [ann[i] for i in keep]; imgs = [imgs[i] for i in keep]
    print("web pairs", len(ann))
test = json.load(open(world.test_annotations))
timgs = torch.stack([test_tf(Image.open(world.test_root / a["image"]).convert("RGB")) for a in test])
scenes = load_scenes(world)
collate = CaptionCollator(tok, cfg.max_text_length)
opt = configure_optimizer(pre, lr, float(opts.get("wd", 0.05)))
for g in opt.param_groups: g["betas"] = (0.9, float(opts.get("b2", 0.999)))
rng = random.Random(int(opts.get("seed", 0)))
gen = torch.Generator().manual_seed(0)
B = int(opts.get("bs", 32))
warm = int(opts.get("warm", 50))
t0 = time.time()

import pyarrow.parquet as pq
from vlp_core.scoring import score_captions
pairs = pq.read_table(world.web_pairs).to_pylist()
noise = {r["key"]: r["noise_type"] for r in pq.read_table(world.web_noise).to_pylist()}
sel = [p for p in pairs if (world.web_images / (p["key"] + ".jpg")).exists() and noise[p["key"]] in ("clean", "wrong_attribute", "partial", "other_image")][:600]
wimgs = torch.stack([test_tf(Image.open(world.web_images / (p["key"] + ".jpg")).convert("RGB")) for p in sel])

def evaluate_filter():
    sc = score_captions(model, tok, wimgs, [[p["caption"]] for p in sel])
    by = {}
    for p, s_ in zip(sel, sc):
        by.setdefault(noise[p["key"]], []).append(s_.itm[0])
    clean = np.array(by["clean"]); wrong = np.array(by["wrong_attribute"])
    auc = float((clean[:, None] > wrong[None, :]).mean())
    return "auc_clean_vs_wrong=%.3f " % auc + " ".join(f"{k}:removed@.5={np.mean(np.array(v) < 0.5):.2f}" for k, v in sorted(by.items()))

def evaluate():
    model.eval()
    with torch.no_grad():
        caps = []
        for s in range(0, len(test), 50):
            caps += [c[0] for c in generate(model, tok, timgs[s:s+50], method="greedy", max_length=30, prompt=opts.get("evalprompt"))]
        trcaps = [c[0] for c in generate(model, tok, torch.stack([test_tf(human_imgs[i]) for i in range(100)]), method="greedy", max_length=30, prompt=opts.get("evalprompt"))]
    model.train()
    acc = float(np.mean([attribute_accuracy(c, scenes[a["image_id"]]) for c, a in zip(caps, test)]))
    tracc = float(np.mean([attribute_accuracy(c, scenes[a["image_id"]]) for c, a in zip(trcaps, human_ann[:100])]))
    return f"test={acc:.3f} train={tracc:.3f} distinct={len(set(caps))}", caps[:2]

for step in range(steps):
    lr_now = lr * (step + 1) / warm if step < warm else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
    for g in opt.param_groups: g["lr"] = lr_now
    idx = [rng.randrange(len(ann)) for _ in range(B)]
    caps = [prompt + rng.choice(ann[i]["caption"]) for i in idx]
    px = torch.stack([train_tf(imgs[i]) for i in idx])
    ids, mask = tokenize(tok, caps, cfg.max_text_length, "cpu")
    if opts.get("mbn") == "eval" and hasattr(pre, "momentum_model"):
        online = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m, o in zip([m for m in pre.momentum_model.modules() if isinstance(m, nn.BatchNorm2d)], online):
            m.eval(); m.running_mean.copy_(o.running_mean); m.running_var.copy_(o.running_var)
    if mode in ("pre", "lmfirst"):
        first = ("itc",) if mode == "pre" else ("lm",)
        obj = first if step < itc_warm else PRETRAIN
        out = pre(px, ids, mask, torch.tensor(idx), 0.0, gen, hardness=min(1.0, max(0, step - itc_warm) / 200), objectives=obj)
    else:
        out = pre(px, ids, mask, torch.tensor(idx), 0.0, gen, hardness=1.0)
    opt.zero_grad(); out["loss"].backward(); opt.step()
    if (step + 1) % int(opts.get("every", steps)) == 0 or step + 1 == steps:
        extra = evaluate() if mode == "cap" else (evaluate_filter() if mode not in ("itc", "pre", "lmfirst") else (evaluate(), evaluate_filter()) if mode in ("pre", "lmfirst") else "")
        print(f"{name} step {step+1} {time.time()-t0:.0f}s " + " ".join(f"{k}={v.item():.3f}" for k, v in out.items()), extra, flush=True)
