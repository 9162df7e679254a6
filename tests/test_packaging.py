"""What a user installs: the wheel carries every module and the web page's files (an editable
install hides a missing one: it reads them from the source tree)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_modules_and_the_web_page(tmp_path):
    # Built from the tracked files alone, as from a fresh clone: a local .egg-info would list files for it.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    tree = tmp_path / "tree"
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(tree)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lungxray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {name.removeprefix("src/") for name in tracked if name.startswith("src/")}
    assert {"lungxray/serve/static/index.html", "lungxray/serve/static/app.js"} <= wanted
    assert wanted - names == set()
