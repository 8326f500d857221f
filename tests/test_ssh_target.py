"""`oncolite benchmark --target ssh://...` against a real sshd on 127.0.0.1 with a throwaway user.

The test starts its own sshd (own config, host key, port, pid file) and stops it. The remote
interpreter: the throwaway user cannot run this repo's venv python (it lives under /root, mode
700), so the test gives it a venv of Debian's /usr/bin/python3 (same 3.11 ABI) whose only extra
path entry is a folder of symlinks to the installed third-party packages (numpy, pillow,
ai-edge-litert, ...) WITHOUT the editable oncolite install: the edge_runtime that runs remotely is
the copy the target streamed over, as on a real Raspberry Pi.
"""

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oncolite.cli import main as oncolite
from tests.test_bench_report import make_tiny_run

pytestmark = pytest.mark.ssh

SSHD = "/usr/sbin/sshd"
SYSTEM_PYTHON = "/usr/bin/python3"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (useradd, sshd)"
    if not os.path.exists(SSHD) or not shutil.which("ssh"):
        return "needs Debian's openssh-server and openssh-client (apt-get install -y openssh-server)"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"needs {SYSTEM_PYTHON} for the throwaway user"
    system = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if system.stdout.strip() != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is not Python {sys.version_info[0]}.{sys.version_info[1]}: cannot share this venv's packages"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(user: str, *cmd):
    subprocess.run(["runuser", "-u", user, "--", *cmd], check=True, capture_output=True)


def _remote_python(user: str, home: Path) -> str:
    """A venv of Debian's python for `user`, seeing this venv's third-party packages but not oncolite."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()))
    farm = home / "site-farm"
    _as_user(user, "mkdir", "-p", str(farm))
    for entry in site.iterdir():
        if entry.name.startswith(("__editable__", "oncolite")) or entry.suffix == ".pth":
            continue
        (farm / entry.name).symlink_to(entry)
    _as_user(user, SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(home / "venv"))
    pth = home / "venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "farm.pth"
    pth.write_text(f"{farm}\n")
    return str(home / "venv" / "bin" / "python")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("sshd")
    user = f"onco{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True, capture_output=True)
    subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)  # unlocked, still no password
    home = Path(pwd.getpwnam(user).pw_dir)
    pid_file = tmp / "sshd.pid"
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "user_key")], check=True)
        _as_user(user, "mkdir", "-m", "700", "-p", str(home / ".ssh"))
        keys = home / ".ssh" / "authorized_keys"
        keys.write_text((tmp / "user_key.pub").read_text())
        shutil.chown(keys, user, user)
        keys.chmod(0o600)
        port = _free_port()
        config = tmp / "sshd_config"
        config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\n"
                          f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                          f"PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n"
                          f"PidFile {pid_file}\nAllowUsers {user}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        subprocess.run([SSHD, "-f", str(config), "-E", str(tmp / "sshd.log")], check=True)
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        python = _remote_python(user, home)
        yield {"user": user, "port": port, "key": str(tmp / "user_key"), "python": python, "home": home,
               "log": tmp / "sshd.log"}
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)
        subprocess.run(["userdel", "-r", "-f", user], capture_output=True)


def test_benchmark_runs_on_an_ssh_target_and_pulls_results_back(sshd, tmp_path):
    run = make_tiny_run(tmp_path / "run")
    target = (f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}"
              f"?python={sshd['python']}&identity={sshd['key']}&strict=no")
    code = oncolite(["benchmark", str(run), "--threads", "1", "--runs", "3", "--warmup", "1", "--bootstrap", "20",
                     "--target", target, "--quiet"])
    report = json.loads((run / "benchmark" / "report.json").read_text())
    assert code == 0, (report["failures"], sshd["log"].read_text()[-2000:])
    device = report["devices"][target]
    assert device["kind"] == "ssh" and device["machine"]["python"].startswith("3.11")
    assert set(device["variants"]) == {"tflite_fp32", "tflite_int8_ptq"}
    for v in device["variants"].values():
        assert v["latency_ms"]["1"]["p50"] > 0
        # Same model, same images, same default resolver on the same CPU: the same answers.
        assert v["agreement_with_local"] == 1.0 and v["max_abs_prob_diff"] < 1e-5
    # The copied runtime ran, not this checkout: it is in the user's home.
    assert (sshd["home"] / ".oncolite-bench" / "run" / "edge_runtime" / "preprocess.py").is_file()
    assert f"Device {target}" in (run / "benchmark" / "report.md").read_text()
