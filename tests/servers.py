"""A real `lungxray serve` process for the tests that need one: started on a free loopback port, waited
for until /api/health answers, stopped (SIGTERM, then waited for) at the end."""

import contextlib
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_distribute import free_ports


@contextlib.contextmanager
def lungxray_serve(model, *options: str, scheme: str = "http", verify=True, stdout=subprocess.DEVNULL):
    """Yields (url, port, process)."""
    port = free_ports(1)[0]
    process = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "serve", "--model", str(model), "--port",
                                str(port), *options], stdout=stdout, stderr=subprocess.PIPE, text=True)
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/api/health", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"lungxray serve did not start: {process.communicate()[1][-2000:]}")
                time.sleep(0.1)
        yield url, port, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=40)
