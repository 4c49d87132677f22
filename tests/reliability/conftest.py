"""One real download (img2dataset) of the hostile web, shared by the reliability tests."""

import pytest
from hostile_web import (
    BAD_CAPTIONS,
    INTERNAL_HOST,
    HostileDownload,
    HostileWeb,
    Reply,
    csv_field,
    download_cases,
    image_payloads,
)

from pipelines.manifests.manifest import Generation
from pipelines.stages.download import DownloadConfig, download


@pytest.fixture(scope="session")
def hostile_download(tmp_path_factory: pytest.TempPathFactory) -> HostileDownload:
    """Every bad URL, image and caption in one URL list (CSV, raw bytes), downloaded with real img2dataset."""
    with HostileWeb(INTERNAL_HOST, {"/secret.jpg": Reply(body=image_payloads()["jpeg"])}) as internal:
        cases = download_cases(internal.base_url)
        routes = {path: reply for path, reply, _ in cases.values() if reply is not None}
        with HostileWeb("127.0.0.1", routes) as web:
            names, lines = [], [b"url,caption"]
            for name, (path, _, _) in cases.items():
                url = web.base_url + path if path.startswith("/") else path.format(web=web.base_url.split("//")[1])
                names.append(name)
                lines.append(url.encode() + b"," + csv_field(name.encode()))
            for name, caption in BAD_CAPTIONS.items():
                names.append(name)
                lines.append(f"{web.base_url}/jpeg".encode() + b"," + csv_field(caption))
            url_list = tmp_path_factory.mktemp("hostile") / "urls.csv"
            url_list.write_bytes(b"\n".join(lines) + b"\n")
            generation = Generation(tmp_path_factory.mktemp("hostile_manifests"), "hostile", 0)
            config = DownloadConfig(
                samples_per_shard=20,
                threads=16,
                timeout_s=2,
                max_fetch_seconds=3,
                max_image_bytes=2 * 2**20,
                allowed_networks=("127.0.0.1/32",),
            )
            download(config, url_list, generation)
            table = generation.read_samples()
        internal_hits = list(internal.hits)
    rows = {names[int(row["image_id"].removeprefix("web-"))]: row for row in table.to_pylist()}
    expected = {name: reason for name, (_, _, reason) in cases.items()} | dict.fromkeys(BAD_CAPTIONS)
    return HostileDownload(generation, rows, expected, internal_hits, n_urls=len(names))
