import http.client
import io
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.world.generate import WorldConfig, make_world, web_key
from pipelines.world.server import WorldServer

N_WEB = 30
SLOW_SECONDS = 0.3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_world(root, WorldConfig(seed=1, n_web=N_WEB, n_human=1, n_test=1, slow_seconds=SLOW_SECONDS))
    return root


@pytest.fixture(scope="module")
def server(world: Path):
    with WorldServer(world) as running:
        yield running


def _get(server: WorldServer, path: str) -> tuple[int, str, bytes]:
    """GET a raw path (no client-side normalisation of `..`)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def _decodes(body: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()
        return True
    except OSError:
        return False


def test_image_route_serves_the_jpeg(server: WorldServer, world: Path) -> None:
    status, content_type, body = _get(server, "/images/w000001.jpg")
    assert (status, content_type) == (200, "image/jpeg")
    assert body == (world / "web" / "images" / "w000001.jpg").read_bytes() and _decodes(body)


@pytest.mark.parametrize(
    "path, status, content_type, decodes",
    [
        ("/fault/http_404/w000002.jpg", 404, "text/plain", False),
        ("/fault/corrupt/w000002.jpg", 200, "image/jpeg", False),
        ("/fault/html/w000002.jpg", 200, "text/html; charset=utf-8", False),
        ("/fault/slow/w000002.jpg", 200, "image/jpeg", True),
        ("/fault/unknown/w000002.jpg", 404, "text/plain", False),
        ("/images/w999999.jpg", 404, "text/plain", False),
        ("/world.json", 404, "text/plain", False),
        ("/images/../world.json", 404, "text/plain", False),
        ("/images/..%2Fworld.json", 404, "text/plain", False),
        ("/fault/html/../../world.json", 404, "text/plain", False),
    ],
)
def test_routes(server: WorldServer, path: str, status: int, content_type: str, decodes: bool) -> None:
    got_status, got_type, body = _get(server, path)
    assert (got_status, got_type, _decodes(body)) == (status, content_type, decodes)
    assert b"format_version" not in body


def test_corrupt_bytes_are_a_real_prefix_of_the_image(server: WorldServer, world: Path) -> None:
    body = _get(server, "/fault/corrupt/w000003.jpg")[2]
    image = (world / "web" / "images" / "w000003.jpg").read_bytes()
    assert body.startswith(b"\xff\xd8") and image.startswith(body) and 0 < len(body) < len(image)
    cv2 = pytest.importorskip("cv2")  # what img2dataset decodes with
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is None


def test_slow_route_waits_then_serves_the_image(server: WorldServer) -> None:
    start = time.monotonic()
    status, _, body = _get(server, "/fault/slow/w000004.jpg")
    assert status == 200 and _decodes(body)
    assert time.monotonic() - start >= SLOW_SECONDS


def test_url_list_has_one_row_per_web_pair(server: WorldServer, world: Path, tmp_path: Path) -> None:
    path = server.write_url_list(tmp_path / "urls.parquet")
    urls = pq.read_table(path)
    pairs = pq.read_table(world / "web" / "pairs.parquet")
    assert urls.column_names == ["url", "caption"] and urls.num_rows == N_WEB
    assert urls["url"].to_pylist() == [f"{server.base_url}/{p}" for p in pairs["path"].to_pylist()]
    assert urls["caption"].to_pylist() == pairs["caption"].to_pylist()
    assert [web_key(url) for url in urls["url"].to_pylist()] == pairs["key"].to_pylist()


def test_binds_loopback_on_an_ephemeral_port_and_stop_frees_it(world: Path) -> None:
    server = WorldServer(world).start()
    other = WorldServer(world).start()
    host, port = server.base_url.removeprefix("http://").split(":")
    assert host == "127.0.0.1" and int(port) > 0 and other.base_url != server.base_url
    other.stop()
    assert _get(server, "/images/w000001.jpg")[0] == 200
    server.stop()
    assert not server.running
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    with socket.socket() as probe:  # the port can be listened on again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", int(port)))
        probe.listen()


def test_start_twice_is_an_error_and_stop_twice_is_harmless(world: Path) -> None:
    server = WorldServer(world).start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    finally:
        server.stop()
    server.stop()


def test_refuses_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a synthetic world folder"):
        WorldServer(tmp_path)
