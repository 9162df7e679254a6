"""`lungxray data fetch` against a local HTTP server on 127.0.0.1 serving archives the tests build."""

import http.server
import io
import threading
import zipfile

import pytest

from lungxray.cli import main
from lungxray.data.fetch import fetch_dataset
from lungxray.data.records import DataError


def build_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def dataset_zip() -> bytes:
    members = {f"Dataset/{split}/{label}/{label}_{i}.png": b"png-bytes-%d" % i * 200
               for split in ("train", "val", "test") for label in ("covid", "normal", "pneumonia") for i in range(2)}
    return build_zip(members)


class Server:
    """Serves `payload` at /Dataset.zip with Range support; the first `break_after` requests close
    the connection after half the bytes, as a flaky network would."""

    def __init__(self, payload: bytes, break_first: int = 0, honour_range: bool = True):
        self.payload, self.break_first, self.honour_range = payload, break_first, honour_range
        self.requests: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(self.headers.get("Range"))
                start = 0
                if owner.honour_range and self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                body = owner.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if len(owner.requests) <= owner.break_first:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/Dataset.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(payload, **kwargs):
        servers.append(Server(payload, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_fetch_unpacks_and_describes_the_layout(serve, tmp_path, capsys):
    server = serve(dataset_zip())
    assert main(["data", "fetch", "--url", server.url, "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train covid: 2  normal: 2  pneumonia: 2" in out
    assert (tmp_path / "Dataset" / "Dataset" / "test" / "normal" / "normal_1.png").is_file()
    assert main(["data", "fetch", "--url", server.url, "--dest", str(tmp_path), "--print-path"]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "Dataset" / "Dataset").resolve())


def test_broken_connection_resumes_with_range(serve, tmp_path):
    payload = dataset_zip()
    server = serve(payload, break_first=2)
    fetch_dataset(server.url, tmp_path)
    assert server.requests[0] is None and all(r and r.startswith("bytes=") for r in server.requests[1:])
    assert len(server.requests) == 3
    assert (tmp_path / "Dataset.zip").read_bytes() == payload


def test_server_ignoring_range_restarts_cleanly(serve, tmp_path):
    payload = dataset_zip()
    server = serve(payload, break_first=1, honour_range=False)
    fetch_dataset(server.url, tmp_path)
    assert (tmp_path / "Dataset.zip").read_bytes() == payload


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "Dataset/../../escape.txt"])
def test_malicious_member_paths_are_refused(serve, tmp_path, member):
    server = serve(build_zip({"Dataset/train/covid/a.png": b"x", member: b"evil"}))
    with pytest.raises(DataError, match="outside"):
        fetch_dataset(server.url, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest" / "Dataset").exists()


def test_corrupt_archive_is_detected(serve, tmp_path):
    payload = bytearray(dataset_zip())
    payload[200:210] = b"XXXXXXXXXX"  # inside the first member's data: its CRC no longer matches
    server = serve(bytes(payload))
    with pytest.raises(DataError, match="corrupt|not a valid zip"):
        fetch_dataset(server.url, tmp_path)


def test_unreachable_server_says_so(tmp_path, capsys):
    code = main(["data", "fetch", "--url", "http://127.0.0.1:9/Dataset.zip", "--dest", str(tmp_path)])
    assert code == 2 and "rerun to resume" in capsys.readouterr().err
