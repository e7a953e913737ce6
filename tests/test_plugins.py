"""twisted/plugins/grpcmux_plugins.py: discovered, cheap to import, shipped."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from grpcmux.tap import client as client_tap
from grpcmux.tap import server as server_tap

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/grpcmux_plugins.py"


def test_plugins_are_discovered():
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    server = makers["grpcmux-server"]
    client = makers["grpcmux-client"]
    assert server.options is server_tap.Options
    assert server.makeService is server_tap.makeService
    assert client.options is client_tap.Options
    assert client.makeService is client_tap.makeService
    assert server.description and client.description


def test_plugin_module_holds_only_the_two_makers():
    from twisted.plugins import grpcmux_plugins

    makers = [v for v in vars(grpcmux_plugins).values() if IServiceMaker.providedBy(v)]
    assert sorted(m.tapname for m in makers) == ["grpcmux-client", "grpcmux-server"]


def test_plugin_import_is_cheap():
    code = (
        "import sys\n"
        "import twisted.plugins.grpcmux_plugins\n"
        "heavy = [m for m in ('grpc', 'twisted.internet.reactor', 'grpcmux', 'yaml')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO,
                   timeout=60)


def test_no_init_in_twisted_namespace():
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def _copy_source(destination):
    ignore = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache",
        ".pytest_cache",
    )
    shutil.copytree(REPO, destination, ignore=ignore)


def _installed_copies():
    """twisted/plugins/grpcmux_plugins.py files of a pip-installed grpcmux, if any.

    Looked up in the interpreter's site directories, not with importlib.metadata,
    which would find the ``grpcmux.egg-info`` that a build leaves in the work tree.
    """
    dirs = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    return [Path(d) / PLUGIN for d in sorted(dirs) if (Path(d) / PLUGIN).exists()]


def test_installed_copy_is_the_shipped_plugin():
    """Where ``pip install .`` ran (as in CI), its plugin file is this one."""
    for copy in _installed_copies():
        assert copy.read_bytes() == (REPO / PLUGIN).read_bytes()


def test_wheel_ships_the_plugin_and_twistd_finds_it(tmp_path):
    source = tmp_path / "src"
    _copy_source(source)  # build a copy: no build/ or egg-info in the work tree
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "out")],
        cwd=source, check=True, timeout=300,
    )
    (wheel,) = (tmp_path / "out").glob("grpcmux-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert PLUGIN in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "grpcmux/tap/server.py" in names and "grpcmux/config.py" in names
    assert "grpcmux/static/status.js" in names and "grpcmux/static/status.css" in names

    # Installed (unpacked) on its own, away from the work tree, twistd lists both.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in sys.path if p
                                                        and Path(p) != REPO])
    code = (
        "import sys\n"
        "from twisted.scripts.twistd import run\n"
        "import twisted.plugins.grpcmux_plugins as plugins\n"
        "print('plugin file:', plugins.__file__)\n"
        "sys.argv = ['twistd', '--help']\n"
        "run()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    # Where grpcmux is also pip-installed (as CI does), twisted/plugins in
    # site-packages holds that copy and may be scanned first: either will do.
    found = [site / PLUGIN, *_installed_copies()]
    assert any(f"plugin file: {path}" in result.stdout for path in found), (
        result.stdout + result.stderr
    )
    assert "grpcmux-server" in result.stdout
    assert "grpcmux-client" in result.stdout
