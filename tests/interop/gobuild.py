"""Build the Go programs: the interop peers (``yamuxpeer``, ``legacyclient``,
``legacyserver``) and the benchmark's ``echobackend`` and ``loadgen``.

They are built in GOPATH mode from Debian's packages only (``golang-go``,
``golang-github-hashicorp-yamux-dev``, ``golang-google-grpc-dev``; ``.ci/run``
installs them), with no network. This directory is linked into a private
GOPATH as ``grpcmuxinterop`` so the programs can share ``legacy/grpcproxy``,
and ``benchmarks/go`` as ``grpcmuxbench`` (``benchpb``, ``cli``).
Binaries, that GOPATH and Go's build cache live outside the checkout (a link
inside it would make a loop for anything that copies the tree): in
``$GRPCMUX_GO_CACHE`` if set, else in a per-user, per-checkout temp directory.

A missing toolchain or package raises ``GoBuildError``: interop tests fail,
they never skip.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

INTEROP_DIR = Path(__file__).resolve().parent
DEBIAN_GOPATH = Path("/usr/share/gocode")
# Import root -> the source tree linked there in the private GOPATH.
TREES = {
    "grpcmuxinterop": INTEROP_DIR,
    "grpcmuxbench": INTEROP_DIR.parents[1] / "benchmarks" / "go",
}
# Program -> its Go import path.
PROGRAMS = {
    "yamuxpeer": "grpcmuxinterop/yamuxpeer",
    "legacyclient": "grpcmuxinterop/legacy/legacyclient",
    "legacyserver": "grpcmuxinterop/legacy/legacyserver",
    "interopserver": "grpcmuxinterop/grpcinterop/server",
    "interopclient": "grpcmuxinterop/grpcinterop/client",
    "echobackend": "grpcmuxbench/echobackend",
    "loadgen": "grpcmuxbench/loadgen",
    "relay": "grpcmuxbench/relay",
}
# Go import path -> the Debian package that ships it.
REQUIRED_SOURCES = {
    "github.com/hashicorp/yamux": "golang-github-hashicorp-yamux-dev",
    "google.golang.org/grpc": "golang-google-grpc-dev",
}
BUILD_TIMEOUT = 600.0

_built = {}
_lock = threading.Lock()


class GoBuildError(RuntimeError):
    """The Go peers cannot be built here; the message says what to install."""


def build(name):
    """Return the path of the built program ``name``, building it once per process."""
    if name not in PROGRAMS:
        raise GoBuildError(f"unknown Go program {name!r}; known: {sorted(PROGRAMS)}")
    with _lock:
        if name not in _built:
            _built[name] = _go_build(name)
        return _built[name]


def cache_dir():
    """Where binaries, the private GOPATH and Go's build cache are kept."""
    configured = os.environ.get("GRPCMUX_GO_CACHE")
    if configured:
        return Path(configured)
    checkout = hashlib.sha256(str(INTEROP_DIR).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"grpcmux-interop-{os.getuid()}" / checkout


def _go_build(name):
    go = shutil.which("go")
    if go is None:
        raise GoBuildError(
            "the Go toolchain is missing: apt-get install golang-go "
            "golang-github-hashicorp-yamux-dev golang-google-grpc-dev (see .ci/run)"
        )
    missing = [
        package
        for source, package in REQUIRED_SOURCES.items()
        if not (DEBIAN_GOPATH / "src" / source).is_dir()
    ]
    if missing:
        raise GoBuildError(
            f"Go sources missing under {DEBIAN_GOPATH}: apt-get install {' '.join(missing)}"
            " (see .ci/run)"
        )
    cache = cache_dir()
    gopath = cache / "gopath"
    for root, tree in TREES.items():
        _link_sources(gopath / "src" / root, tree)
    output = cache / "bin" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=f"{gopath}{os.pathsep}{DEBIAN_GOPATH}",
        GOCACHE=str(cache / "gocache"),
        GOFLAGS="",
        GOPROXY="off",
        CGO_ENABLED="0",  # no C compiler needed
    )
    command = [go, "build", "-o", str(output), PROGRAMS[name]]
    try:
        result = subprocess.run(
            command,
            cwd=INTEROP_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise GoBuildError(f"`{' '.join(command)}` took longer than {BUILD_TIMEOUT}s") from exc
    if result.returncode != 0:
        raise GoBuildError(
            f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr}"
        )
    return output


def _link_sources(link, tree):
    """Point ``link`` at ``tree`` (idempotent, safe if the checkout moved)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == tree:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(tree, target_is_directory=True)
