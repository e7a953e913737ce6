"""contrib/systemd: the shipped unit files load cleanly and say what we promise.

``systemd-analyze verify`` (Debian package ``systemd``) checks every unit; it
needs no systemd running as PID 1, so this works as root inside CI containers.
It refuses a unit whose ExecStart binary is missing, so the test verifies copies
whose ``/usr/local/bin/twistd`` points at a stand-in executable in tmp_path.
The command lines are parsed by the real plugin Options, and the activated
server and a client instance, run as their units say under the units' seccomp
filters (rebuilt with libseccomp, which the systemd package depends on) and
with a stand-in for socket activation, carry a gRPC call.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from grpcmux.config import ServerSettings
from grpcmux.tap import client as client_tap
from grpcmux.tap import server as server_tap
from interop.peers import Peer, python_env
from rpc_backend import Backend, invoke

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "contrib" / "systemd"
SERVER = "grpcmux-server.service"
ACTIVATED = "grpcmux-server-activated.service"
SOCKET = "grpcmux-server.socket"
CLIENT = "grpcmux-client@.service"
SERVICES = (SERVER, ACTIVATED, CLIENT)
TWISTD = "/usr/local/bin/twistd"
TIMEOUT = 30.0

HARDENING = {
    "DynamicUser": "yes",
    "CapabilityBoundingSet": "",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
}


def parse_unit(text):
    """``{section: {key: [values]}}`` of a unit file (comments, continuations)."""
    sections = {}
    current = None
    logical = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name):
    return parse_unit((UNIT_DIR / name).read_text())


def exec_argv(name, runtime="/run", instance="edge-1"):
    """ExecStart of a service as argv, with the %t and %i specifiers filled in."""
    (command,) = unit(name)["Service"]["ExecStart"]
    command = command.replace("%t", runtime).replace("%i", instance)
    assert "%" not in command, command
    return shlex.split(command)


def plugin_args(argv, plugin):
    """The arguments twistd hands to *plugin*, after checking twistd's own ones."""
    assert argv[0] == TWISTD
    position = argv.index(plugin)
    assert argv[1:position] == ["--nodaemon", "--pidfile="]
    return argv[position + 1:]


@pytest.fixture
def analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: install the Debian package 'systemd'")
    return path


def test_systemd_analyze_verify_is_clean(tmp_path, analyze):
    stand_in = tmp_path / "bin" / "twistd"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copies = tmp_path / "units"
    copies.mkdir()
    for name in (*SERVICES, SOCKET):
        text = (UNIT_DIR / name).read_text()
        if name != SOCKET:
            assert TWISTD in text, name
        (copies / name).write_text(text.replace(TWISTD, str(stand_in)))
    targets = [copies / SERVER, copies / SOCKET, copies / ACTIVATED,
               copies / "grpcmux-client@edge-1.service"]
    result = subprocess.run([analyze, "verify", "--man=no", *map(str, targets)],
                            cwd=copies, capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    ours = [line for line in result.stderr.splitlines()
            if "grpcmux" in line or str(copies) in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_verify_reports_a_broken_unit(tmp_path, analyze):
    """The stderr check above has teeth: a misspelt key is reported there."""
    broken = tmp_path / "grpcmux-broken.service"
    broken.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n")
    result = subprocess.run([analyze, "verify", "--man=no", str(broken)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert "ProtectSytem" in result.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_services_are_hardened_and_restart_on_failure(name):
    service = unit(name)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], key
    assert service["RestartSec"] == ["5s"]
    assert service["Type"] == ["simple"]
    assert service["UMask"] == ["0077"]
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert service["SystemCallErrorNumber"] == ["EPERM"]


@pytest.mark.parametrize("name", SERVICES)
def test_stop_timeout_exceeds_the_shutdown_grace(name):
    (timeout,) = unit(name)["Service"]["TimeoutStopSec"]
    assert timeout.endswith("s")
    assert float(timeout[:-1]) > ServerSettings().shutdown_grace


@pytest.mark.parametrize("name", (SERVER, ACTIVATED))
def test_server_bridge_sockets_live_in_a_private_runtime_directory(name, tmp_path):
    service = unit(name)["Service"]
    assert service["RuntimeDirectory"] == ["grpcmux"]
    assert service["RuntimeDirectoryMode"] == ["0700"]
    args = plugin_args(exec_argv(name), "grpcmux-server")
    assert args[:2] == ["--runtime-dir", "/run/grpcmux"]


def parse_options(module, args, tmp_path):
    """Parse a unit's plugin arguments with the real Options, ignoring host config."""
    options = module.Options(environ={}, home=str(tmp_path), etc_dir=str(tmp_path))
    options.parseOptions(args)
    return options.settings


def test_server_command_line_parses(tmp_path):
    settings = parse_options(server_tap, plugin_args(exec_argv(SERVER), "grpcmux-server"),
                             tmp_path)
    assert settings.runtime_dir == "/run/grpcmux"
    # Everything else is left to the YAML file and GRPCMUX_* variables.
    assert settings.multiplexer_listener == "localhost:7602"


def test_client_instance_name_is_the_client_id(tmp_path):
    parsed = unit(CLIENT)
    args = plugin_args(exec_argv(CLIENT, instance="edge-1"), "grpcmux-client")
    assert args == ["--client-id", "edge-1"]
    assert parse_options(client_tap, args, tmp_path).client_id == "edge-1"
    assert "--client-id %i" in parsed["Service"]["ExecStart"][0]
    assert parsed["Service"]["EnvironmentFile"] == ["-/etc/grpc-multiplexer/client-%i.env"]
    assert parsed["Unit"]["Wants"] == ["network-online.target"]
    assert parsed["Unit"]["After"] == ["network-online.target"]


def test_socket_unit_feeds_the_activated_service():
    socket_unit = unit(SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["0.0.0.0:7602"]
    assert socket_unit["Socket"]["Service"] == [ACTIVATED]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]
    activated = unit(ACTIVATED)
    assert activated["Unit"]["Requires"] == [SOCKET]
    assert SOCKET in activated["Unit"]["After"][0].split()
    assert activated["Unit"]["Conflicts"] == [SERVER]
    assert activated["Install"] == {"WantedBy": ["multi-user.target"], "Also": [SOCKET]}
    args = plugin_args(exec_argv(ACTIVATED), "grpcmux-server")
    assert args[args.index("--multiplexer-listener") + 1] == "systemd:domain=INET:index=0"


# Preludes run by ``python -c`` before it execs twistd, standing in for what
# systemd does between fork and exec.

# MemoryDenyWriteExecute=yes, as systemd builds it (seccomp-util.c): EPERM for
# mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC and
# shmat with SHM_EXEC. libseccomp2 comes with the systemd package. A W+X mmap
# right after proves the filter bites.
DENY_WRITE_EXECUTE = textwrap.dedent("""
    import ctypes, errno, json, mmap, os, socket, sys

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    context = seccomp.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    MASKED_EQ, EPERM = 7, 0x00050000 | errno.EPERM
    WX, X, SHM_EXEC = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC, 0o100000
    for name, mask in (("mmap", WX), ("mprotect", X), ("pkey_mprotect", X),
                       ("shmat", SHM_EXEC)):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        rule = Cmp(2, MASKED_EQ, mask, mask)
        assert seccomp.seccomp_rule_add_array(context, EPERM, number, 1, rule) == 0, name
    assert seccomp.seccomp_load(context) == 0
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | WX)
        state = "inactive"
    except PermissionError:
        state = "active"
    print(json.dumps({"deny_write_execute": state}), flush=True)
""")

# SystemCallFilter= with SystemCallErrorNumber=EPERM: every system call not
# allowed fails with EPERM. Format with the allowed names.
SYSTEM_CALL_FILTER = textwrap.dedent("""
    allowed = seccomp.seccomp_init(EPERM)
    for name in {names!r}:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # names of other architectures do not resolve
            assert seccomp.seccomp_rule_add_array(allowed, 0x7FFF0000, number, 0, None) == 0
    assert seccomp.seccomp_load(allowed) == 0
""")

# Socket activation: listen, put the socket at fd 3, announce the port, set
# LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (systemd >= 227 sets all three).
ACTIVATE = textwrap.dedent("""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    os.set_inheritable(3, True)
    print(json.dumps({"activation_port": listener.getsockname()[1]}), flush=True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
                      LISTEN_FDNAMES="grpcmux-server.socket")
""")

EXEC_TWISTD = textwrap.dedent("""
    os.execv(sys.executable, [sys.executable, "-c",
             "from twisted.scripts.twistd import run; run()", *sys.argv[1:]])
""")


def filter_syscalls(analyze, group="@system-service"):
    """The system call names in a systemd filter group, nested groups expanded."""
    listing = subprocess.run([analyze, "syscall-filter", group], capture_output=True,
                             text=True, check=True, timeout=TIMEOUT).stdout
    names = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if entry.startswith("@"):
            names |= filter_syscalls(analyze, entry)
        elif entry and not entry.startswith("#"):
            names.add(entry)
    return names


def allowed_syscalls(analyze, name):
    """The system calls a service's SystemCallFilter= lines allow (allow list first)."""
    allowed = set()
    for line in unit(name)["Service"]["SystemCallFilter"]:
        deny = line.startswith("~")
        names = set().union(*(filter_syscalls(analyze, group)
                              for group in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@pytest.fixture
def sandbox(analyze):
    """Preludes applying a unit's MemoryDenyWriteExecute and SystemCallFilter."""

    def prelude(name):
        names = allowed_syscalls(analyze, name)
        assert {"mmap", "socket", "accept4", "epoll_wait", "execve"} <= names
        assert not {"setrlimit", "chown", "setuid"} & names
        return DENY_WRITE_EXECUTE + SYSTEM_CALL_FILTER.format(names=sorted(names))

    return prelude


def run_unit(prelude, argv, tmp_path):
    """The unit's command line (twistd run by this interpreter) after *prelude*."""
    assert argv[0] == TWISTD
    env = {key: value for key, value in python_env().items()
           if not key.startswith(("GRPCMUX_", "LISTEN_"))}
    env["HOME"] = str(tmp_path)
    return Peer([sys.executable, "-c", prelude + EXEC_TWISTD, *argv[1:],
                 "--log-format", "json"], env=env)


def wait_for_event(peer, predicate):
    line = peer.read_until(lambda text: text.startswith("{") and predicate(json.loads(text)),
                           timeout=TIMEOUT)
    return json.loads(line)


def sandboxed(peer):
    return wait_for_event(peer, lambda e: "deny_write_execute" in e)["deny_write_execute"] == "active"


def message(text):
    return lambda event: text in event.get("message", "")


@pytest.fixture
def backend(tmp_path):
    b = Backend(str(tmp_path / "backend.sock"), tcp=True)
    yield b
    b.stop()


def test_units_carry_a_call_socket_activated_and_sandboxed(tmp_path, backend, sandbox):
    """The activated server and a client instance, as their units run them.

    Both run under their units' seccomp filters (MemoryDenyWriteExecute=yes,
    SystemCallFilter=), so a W+X mapping or an unusual system
    call anywhere in Twisted, grpcio or protobuf would fail this test.
    """
    runtime = tmp_path / "run"
    server_argv = exec_argv(ACTIVATED, runtime=str(runtime)) + ["--proxy-listener",
                                                                  "127.0.0.1:0"]
    with run_unit(sandbox(ACTIVATED) + ACTIVATE, server_argv, tmp_path) as server:
        assert sandboxed(server)
        port = wait_for_event(server, lambda e: "activation_port" in e)["activation_port"]
        listening = wait_for_event(server, message("multiplexer endpoint listening"))
        assert str(port) in json.dumps(listening)
        proxy = wait_for_event(server, message("proxy endpoint listening"))
        assert oct((runtime / "grpcmux").stat().st_mode & 0o777) == "0o700"
        client_argv = exec_argv(CLIENT, instance="edge-1") + [
            "--multiplexer-address", f"127.0.0.1:{port}",
            "--grpc-server-address", backend.tcp_address]
        with run_unit(sandbox(CLIENT), client_argv, tmp_path) as client:
            assert sandboxed(client)
            wait_for_event(client, message("connected to multiplexer"))
            wait_for_event(server, lambda e: e.get("client_id") == "edge-1")
            channel = grpc.insecure_channel(f"127.0.0.1:{proxy['port']}")
            try:
                result = invoke(channel, "Unary", b"via systemd units",
                                (("client-id", "edge-1"),), TIMEOUT)
            finally:
                channel.close()
            assert (result.code, result.responses) == (grpc.StatusCode.OK,
                                                        [b"via systemd units"])
            client.process.send_signal(signal.SIGTERM)
            assert client.wait(TIMEOUT) == 0
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
    assert "Traceback" not in server.stderr + client.stderr
