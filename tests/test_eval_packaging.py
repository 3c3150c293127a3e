"""`adapters/` installs as `atpt_plugin.adapters`, never as a top-level `adapters` module."""

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PROBE = """
import importlib, importlib.util, json, sys
import atpt_plugin.adapters, atpt_plugin.adapters.cli
for package in sys.argv[1:]:  # every listed package imports from the installed copy
    importlib.import_module(package)
print(json.dumps({"file": atpt_plugin.adapters.__file__, "top_level": importlib.util.find_spec("adapters") is not None,
                  "cli": atpt_plugin.adapters.cli.__name__}))
"""


def folders_as_packages():
    """Every folder of the source tree (data folders too) under the package name it installs as."""
    names = set()
    for root, prefix in ((ROOT / "atpt_plugin", ("atpt_plugin",)), (ROOT / "adapters", ("atpt_plugin", "adapters"))):
        for folder in [root, *root.rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(f.is_file() for f in folder.iterdir()):
                names.add(".".join(prefix + folder.relative_to(root).parts))
    return names


def listed_packages():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def probe(cwd, packages=(), **env):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *packages],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_package_is_listed_and_adapters_is_mapped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    assert tool["package-dir"] == {"atpt_plugin.adapters": "adapters"}
    on_disk = folders_as_packages()  # adapters/ and the data folders too: unlisted, setuptools warns or drops them
    assert {"atpt_plugin.adapters.attacks", "atpt_plugin.demo_model.weights"} <= on_disk
    assert on_disk == set(tool["packages"]), (
        f"add {sorted(on_disk - set(tool['packages']))} to [tool.setuptools] packages, "
        f"remove {sorted(set(tool['packages']) - on_disk)}"
    )
    assert "adapters" not in tool["packages"] and "atpt_plugin.adapters" in tool["packages"]
    assert config["project"]["scripts"]["atpt"] == "atpt_plugin.adapters.cli:main"


@pytest.mark.slow
def test_installed_distribution_imports_the_mapped_package(tmp_path):
    """The installed atpt-plugin (editable here, a wheel for users), seen from outside the repository."""
    found = probe(tmp_path)
    assert not found["top_level"], "a top-level module named `adapters` is importable"
    direct = metadata.distribution("atpt-plugin").read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        assert Path(found["file"]) == ROOT / "adapters" / "__init__.py"
    scripts = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "atpt"]
    assert scripts and scripts[0].value == "atpt_plugin.adapters.cli:main"


@pytest.mark.slow
@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_wheel_holds_atpt_plugin_adapters_and_no_top_level_adapters(tmp_path):
    """A normal (non-editable) install: build the wheel (without a packaging warning), install it
    into a folder, import every listed package from there."""
    setuptools_version = (
        tuple(int(p) for p in metadata.version("setuptools").split(".")[:2]) if _has("setuptools") else (0, 0)
    )
    # offline with the environment's setuptools where it is recent enough, else pip's isolated build
    isolation = ["--no-build-isolation"] if setuptools_version >= (77, 0) else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-v", "-w", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    log = built.stdout + built.stderr
    assert "would be ignored" not in log and "absent from the `packages`" not in log, log[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("atpt_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "atpt_plugin/adapters/__init__.py" in names and "atpt_plugin/adapters/cli.py" in names
    shipped = [p.relative_to(ROOT).as_posix() for p in (ROOT / "atpt_plugin" / "demo_model").rglob("*.*")]
    assert {p for p in shipped if "__pycache__" not in p} <= set(names), "the demo model's data is in the wheel"
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
    found = probe(tmp_path, listed_packages(), PYTHONPATH=str(target))
    assert Path(found["file"]) == target / "atpt_plugin" / "adapters" / "__init__.py"
    assert not found["top_level"]


def _has(name):
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
