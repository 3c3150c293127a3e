"""`adapters/` installs as `atpt_plugin.adapters`, never as a top-level `adapters` module."""

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds wheels

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PROBE = """
import importlib.util, json, sys
import atpt_plugin.adapters, atpt_plugin.adapters.cli
print(json.dumps({"file": atpt_plugin.adapters.__file__, "top_level": importlib.util.find_spec("adapters") is not None,
                  "cli": atpt_plugin.adapters.cli.__name__}))
"""


def probe(cwd, **env):
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_package_is_listed_and_adapters_is_mapped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    assert tool["package-dir"] == {"atpt_plugin.adapters": "adapters"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "atpt_plugin").rglob("__init__.py")}
    assert on_disk <= set(tool["packages"]), (
        f"add {sorted(on_disk - set(tool['packages']))} to [tool.setuptools] packages"
    )
    assert "adapters" not in tool["packages"] and "atpt_plugin.adapters" in tool["packages"]
    assert config["project"]["scripts"]["atpt"] == "atpt_plugin.adapters.cli:main"


def test_installed_distribution_imports_the_mapped_package(tmp_path):
    """The installed atpt-plugin (editable here, a wheel for users), seen from outside the repository."""
    found = probe(tmp_path)
    assert not found["top_level"], "a top-level module named `adapters` is importable"
    direct = metadata.distribution("atpt-plugin").read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        assert Path(found["file"]) == ROOT / "adapters" / "__init__.py"
    scripts = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "atpt"]
    assert scripts and scripts[0].value == "atpt_plugin.adapters.cli:main"


def test_wheel_holds_atpt_plugin_adapters_and_no_top_level_adapters(tmp_path):
    """A normal (non-editable) install: build the wheel, install it into a folder, import from there."""
    setuptools_version = (
        tuple(int(p) for p in metadata.version("setuptools").split(".")[:2]) if _has("setuptools") else (0, 0)
    )
    # offline with the environment's setuptools where it is recent enough, else pip's isolated build
    isolation = ["--no-build-isolation"] if setuptools_version >= (77, 0) else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("atpt_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "atpt_plugin/adapters/__init__.py" in names and "atpt_plugin/adapters/cli.py" in names
    assert all(n.startswith(("atpt_plugin/", "atpt_plugin-")) for n in names), sorted({n.split("/")[0] for n in names})
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert not (target / "adapters").exists()
    found = probe(tmp_path, PYTHONPATH=str(target))
    assert Path(found["file"]) == target / "atpt_plugin" / "adapters" / "__init__.py"
    assert not found["top_level"]


def _has(name):
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
