"""The stage commands on URIs: a world, a URL list, manifests, released models and a report that live only in
an S3 bucket (moto's server on 127.0.0.1, `bucket` in tests/conftest.py), with the commands the README shows,
and an ablation arm whose image refs climb out of its dataset folder."""

import gzip
import io

import pyarrow.csv as pacsv
from released_models import released_captioner, released_filter

from flows.cli import main
from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation
from pipelines.stages.ablate import ARMS, derive_arm
from pipelines.stages.assemble import AssembleConfig
from pipelines.world.server import WorldServer
from vlp_core.clip import load_clip, save_clip
from vlp_core.storage import read_parquet


def test_the_stage_commands_take_uris(bucket, tmp_path, capsys) -> None:
    world, root = bucket / "world", bucket / "manifests"
    assert main(["world", "--out", str(world), "--n-web", "12", "--n-human", "4", "--n-test", "4"]) == 0
    with WorldServer(world) as server:  # what `capfilt serve-world` serves, from the bucket
        server.write_url_list(bucket / "urls.parquet")
        text = io.BytesIO()
        pacsv.write_csv(read_parquet(bucket / "urls.parquet"), text)
        (bucket / "urls.csv.gz").write_bytes(gzip.compress(text.getvalue()))
        download = ["download", "--url-list", str(bucket / "urls.csv.gz"), "--root", str(root)]
        assert main([*download, "--allow-network", "127.0.0.1/32"]) == 0
    web = Generation(root, "web", 0)
    rows = web.read_samples().to_pylist()
    assert len(rows) == 12 and sum(row["kept"] for row in rows) >= 9
    assert main(["generations", "--root", str(root)]) == 0 and "web      0" in capsys.readouterr().out
    assert main(["explain", rows[0]["url"], "--root", str(root)]) == 0
    assert rows[0]["url"] in capsys.readouterr().out

    captioner, filter_model = bucket / "captioner", bucket / "filter"
    assert main(["import-hf", str(released_captioner(tmp_path / "captioner")), str(captioner)]) == 0
    filter_local = released_filter(tmp_path / "filter")
    for path in filter_local.rglob("*"):  # a transformers folder, read from the bucket as it is
        if path.is_file():
            (filter_model / str(path.relative_to(filter_local))).write_bytes(path.read_bytes())
    save_clip(load_clip("clip_tiny"), bucket / "clip.safetensors")
    stage = ["--root", str(root), "--generation", "1", "--batch-size", "4"]
    assert main(["caption", *stage, "--checkpoint", str(captioner), "--num-captions", "2"]) == 0
    assert main(["filter", *stage, "--checkpoint", str(filter_model), "--threshold", "0"]) == 0
    assert (
        main(["rank", *stage, "--clip-model", "clip_tiny", "--clip-checkpoint", str(bucket / "clip.safetensors")]) == 0
    )
    candidates = Generation(root, "web", 1)
    assert candidates.is_done("rank", "00000")
    synthetic = [row for row in candidates.read_samples().to_pylist() if row["caption_source"] == "synthetic"]
    assert len(synthetic) == 2 * sum(row["kept"] for row in rows)
    assert all(row["itm_score"] is not None and row["clip_score"] is not None for row in synthetic)

    human = ["--annotations", str(world / "human" / "annotations.json"), "--image-root", str(world / "human")]
    assert main(["assemble", "--root", str(root), "--generation", "1", *human]) == 0
    arm = derive_arm(
        candidates,
        ARMS["captioner_only"],
        AssembleConfig(world / "human" / "annotations.json", world / "human"),
        {"itm": 0.5},
        2,
    )
    web_row = next(row for row in arm.read_samples().to_pylist() if row["caption_source"] == "web" and row["kept"])
    assert web_row["image_ref"].startswith("../web/gen-0000/shards/")
    assert ImageStore(arm.path.parent).read(web_row["image_ref"]) == ImageStore(root / "web").read(
        next(row["image_ref"] for row in rows if row["image_id"] == web_row["image_id"])
    ), "an arm's refs climb out of its folder to the web shards, in the bucket too"

    assert main(["report", "--root", str(root), "--generation", "0", "--out", str(bucket / "report")]) == 0
    assert "<html" in (bucket / "report" / "index.html").read_text()
    assert not any(tmp_path.glob("**/*.parquet")), "nothing of the manifests is written locally"
