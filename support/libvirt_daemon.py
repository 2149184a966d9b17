"""A real libvirtd (session mode) with the QEMU driver, private to the test run.

As root it runs as the unprivileged user webvirt-test (created by scripts/install); root can
still reach its socket. Otherwise it runs as the current user. Guests use TCG (type='qemu'),
so no access to /dev/kvm is needed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DAEMON_USER = "webvirt-test"
GUEST_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='qemu-xhci'/>
  </devices>
</domain>
"""


def guest_xml(name: str) -> str:
    """A diskless guest: boots in well under a second and ignores ACPI shutdown."""
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return GUEST_XML.format(name=name, emulator=emulator)


class LibvirtDaemon:
    def __init__(self) -> None:
        libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if not os.access(libvirtd, os.X_OK):
            raise RuntimeError("libvirtd not found: run scripts/install (libvirt-daemon)")
        self.libvirtd = libvirtd
        self.user = DAEMON_USER if os.geteuid() == 0 else None
        # Short path: unix socket paths are limited to 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="wvd-", dir="/tmp"))
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.socket = self.base / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.base),
            "XDG_RUNTIME_DIR": str(self.base / "run"),
            "XDG_CONFIG_HOME": str(self.base / "config"),
            "XDG_CACHE_HOME": str(self.base / "cache"),
            "XDG_DATA_HOME": str(self.base / "data"),
        }
        command = [self.libvirtd, "--timeout", "0"]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        (self.base / "run").mkdir(mode=0o700, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base / "run", entry.pw_uid, entry.pw_gid)
        if self.socket.exists():
            self.socket.unlink()
        with open(self.base / "libvirtd.log", "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start; see {self.base / 'libvirtd.log'}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        # runuser stays the parent; signal the whole session so libvirtd itself gets it.
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        # Guests outlive a killed daemon; end any left over from this run.
        subprocess.run(["pkill", "-KILL", "-f", f"qemu-system.*{self.base}"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)
