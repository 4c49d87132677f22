"""Bad images, bad URLs and bad captions through the real download path (img2dataset against loopback).

One download of the hostile web (tests/reliability/conftest.py) is shared: every URL must end as
exactly one manifest row, with the expected status and reason, and the stage must finish.
"""

import io
import urllib.error

import numpy as np
import pytest
from hostile_web import (
    BAD_CAPTIONS,
    BOMB_SIDE,
    OPT_OUT_CASES,
    HostileDownload,
    HostileWeb,
    Reply,
    half_red,
    image_payloads,
)
from PIL import Image

from pipelines.manifests.images import ImageStore
from pipelines.manifests.manifest import Generation
from pipelines.stages.download import DownloadConfig, download
from pipelines.stages.download_worker import FetchGuard, guarded_opener
from pipelines.stages.shards import model_text
from pipelines.stages.url_policy import UrlPolicy
from vlp_core.data import normalize_caption


def _pixels(download: HostileDownload, name: str) -> np.ndarray:
    row = download.rows[name]
    data = ImageStore(download.generation.path.parent).read(row["image_ref"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_every_url_is_one_row_with_the_expected_fate(hostile_download: HostileDownload) -> None:
    table = hostile_download.generation.read_samples()
    assert table.num_rows == hostile_download.n_urls == len(hostile_download.rows)
    fates = {
        name: (row["kept"], row["reject_stage"], row["reject_reason"]) for name, row in hostile_download.rows.items()
    }
    expected = {
        name: (reason is None, None if reason is None else "download", reason)
        for name, reason in hostile_download.expected.items()
    }
    assert fates == expected
    for name, row in hostile_download.rows.items():
        assert bool(row["reject_detail"]) == (not row["kept"]), name  # every reject keeps its message
    info = hostile_download.generation.read_info()
    assert info["counts"]["rows"] == hostile_download.n_urls


def test_nothing_reached_the_internal_address(hostile_download: HostileDownload) -> None:
    """The redirect to 127.0.0.2 (loopback, but outside the allowed 127.0.0.1/32) was refused at connect."""
    assert hostile_download.internal_hits == []
    detail = hostile_download.rows["redirect_to_internal"]["reject_detail"]
    assert "127.0.0.2" in detail and "non-public address" in detail
    assert "169.254.169.254" in hostile_download.rows["redirect_to_metadata"]["reject_detail"]
    assert "file:///etc/passwd" in hostile_download.rows["redirect_to_file"]["reject_detail"]  # urllib's refusal
    assert "'ftp'" in hostile_download.rows["redirect_to_ftp"]["reject_detail"]  # ours: urllib would follow it


def test_bounded_fetches_name_their_limit(hostile_download: HostileDownload) -> None:
    rows = hostile_download.rows
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in rows["bomb"]["reject_detail"]
    assert "above 2097152 bytes" in rows["oversized_body"]["reject_detail"]
    assert "after 3" in rows["drip"]["reject_detail"]  # the whole-body deadline, not a socket timeout
    assert "infinite loop" in rows["redirect_loop"]["reject_detail"]


def test_odd_but_valid_images_download_as_upright_rgb(hostile_download: HostileDownload) -> None:
    rows = hostile_download.rows
    assert (rows["animated_gif"]["width"], rows["animated_gif"]["height"]) == (30, 10)
    assert np.abs(_pixels(hostile_download, "animated_gif") - (255, 0, 0)).max() < 40  # the first frame
    assert np.abs(_pixels(hostile_download, "cmyk_jpeg") - (255, 0, 0)).max() < 40
    grey = _pixels(hostile_download, "png_16bit")
    assert np.abs(grey - round(30000 / 257)).max() < 6  # rescaled, not clipped to white
    rgba = _pixels(hostile_download, "rgba_png")
    assert np.abs(rgba[:, :8] - 255).max() < 40 and np.abs(rgba[:, 12:] - (255, 0, 0)).max() < 40

    upright = np.asarray(half_red().transpose(Image.Transpose.ROTATE_270), dtype=np.int16)  # orientation 6
    assert (rows["exif_rotated"]["width"], rows["exif_rotated"]["height"]) == (20, 40)
    assert np.abs(_pixels(hostile_download, "exif_rotated") - upright).mean() < 8


def test_hashes_are_of_the_bytes_served_and_redirects_within_policy_work(hostile_download: HostileDownload) -> None:
    rows = hostile_download.rows
    assert rows["redirect_ok"]["image_sha256"] == rows["jpeg"]["image_sha256"]
    assert rows["exif_rotated"]["image_sha256"] != rows["jpeg"]["image_sha256"]


def test_bad_captions_download_and_are_cleaned_or_rejected_for_models(hostile_download: HostileDownload) -> None:
    rows = hostile_download.rows
    for name in BAD_CAPTIONS:
        assert rows[name]["kept"], f"{name}: a bad caption does not lose the image"
    assert rows["caption_invalid_utf8"]["caption"] == "caf\ufffd \ufffd au lait"  # repaired, then cleaned:
    assert model_text(rows["caption_invalid_utf8"]["caption"], 300) == "caf au lait"
    assert model_text(rows["caption_empty"]["caption"], 300) is None  # the filter rejects these rows
    assert model_text(rows["caption_whitespace"]["caption"], 300) is None
    assert model_text(rows["caption_html"]["caption"], 300) == "a red circle & alert(1) square"
    assert model_text(rows["caption_control"]["caption"], 300) == "a red circle[31m square next line"
    long = rows["caption_10kB"]["caption"]
    assert len(long) > 10_000 and len(model_text(long, 300)) <= 300
    assert normalize_caption(b"caf\xe9 \xff au lait", 300) == ("caf au lait", "invalid_utf8")


# --------------------------------------------------------------------------- the guarded opener, in process


def _fetch(guard: FetchGuard, url: str) -> bytes:
    with guarded_opener(guard).open(url, timeout=5) as response:
        return response.read()


def _guard(policy: UrlPolicy) -> FetchGuard:
    return FetchGuard(policy, max_bytes=2**20, max_seconds=5, max_pixels=10**6)


def test_dns_is_checked_at_connect_and_the_checked_address_is_used() -> None:
    """A name resolving to a refused address is refused; an allowed one connects to the address checked."""
    dns = {"images.example": ["127.0.0.1"], "rebind.example": ["127.0.0.2"]}
    policy = UrlPolicy(("127.0.0.1/32",), resolver=lambda host: dns[host])
    with HostileWeb("127.0.0.1", {"/a.jpg": Reply(body=b"image bytes")}) as web:
        port = web.base_url.rsplit(":", 1)[1]
        assert _fetch(_guard(policy), f"http://images.example:{port}/a.jpg") == b"image bytes"
        with pytest.raises(urllib.error.URLError, match="url_policy: .* non-public address 127.0.0.2"):
            _fetch(_guard(policy), f"http://rebind.example:{port}/a.jpg")
        with pytest.raises(urllib.error.URLError, match="unknown url type: ftp"):
            _fetch(_guard(policy), "ftp://images.example/a.jpg")
    assert web.hits == ["/a.jpg"]


def test_environment_proxies_are_not_used(monkeypatch) -> None:
    """A proxy would make the policy check the proxy's address, not the target's."""
    monkeypatch.setenv("http_proxy", "http://169.254.169.254:3128")
    with HostileWeb("127.0.0.1", {"/a.jpg": Reply(body=b"direct")}) as web:
        assert _fetch(_guard(UrlPolicy(("127.0.0.1/32",))), f"{web.base_url}/a.jpg") == b"direct"


def test_bad_download_limits_fail_fast() -> None:
    for field in ("max_image_bytes", "max_fetch_seconds", "max_pixels", "timeout_s"):
        with pytest.raises(ValueError, match=f"{field} must be"):
            DownloadConfig(**{field: 0})


def test_opted_out_images_are_rejected_with_their_directive_unless_the_user_ignores_opt_outs(
    hostile_download: HostileDownload, tmp_path
) -> None:
    for name, _, reason in OPT_OUT_CASES:
        row = hostile_download.rows[name]
        assert row["reject_reason"] == reason, name
        assert (row["reject_detail"] or "") == ("Use of image disallowed by X-Robots-Tag directive" if reason else "")
    noai = Reply(body=image_payloads()["jpeg"], headers=(("X-Robots-Tag", "noai"),))
    with HostileWeb("127.0.0.1", {"/noai": noai}) as web:
        url_list = tmp_path / "urls.csv"
        url_list.write_text(f"url,caption\n{web.base_url}/noai,a cat\n")
        config = DownloadConfig(opt_out_directives=(), allowed_networks=("127.0.0.1/32",), timeout_s=2)
        counts = download(config, url_list, Generation(tmp_path / "manifests", "web", 0))
    assert counts["kept"] == counts["rows"] == 1


def test_opt_out_directives_are_normalised_and_never_empty() -> None:
    assert DownloadConfig(opt_out_directives=(" NoAI ",)).opt_out_directives == ("noai",)
    with pytest.raises(ValueError, match="opt_out_directives holds an empty directive"):
        DownloadConfig(opt_out_directives=("noai", " "))
