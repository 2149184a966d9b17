"""The USB lab: a nested "lab host" VM with a real USB bus, for tests that need a USB plug.

These machines have no USB at all. The lab host is a small Debian system booted under QEMU
(TCG: nested KVM does not work here) with an xHCI controller and libvirtd listening on TCP
(no auth) on a loopback-forwarded port. Emulated USB devices are plugged into it and unplugged
over QMP, so that inside it a real plug happens: kernel, udev, libvirt's node-device driver and
its events. Inside it runs a tiny diskless guest, `lab-guest`, to receive devices.

The image is built once from Debian packages with mmdebstrap and cached under
~/.cache/webvirt-usb-lab/HASH (HASH: of the recipe below); each run boots it from a throw-away
overlay. Used by tests/conftest.py and by hand through scripts/usb-lab.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "initramfs-tools", "linux-image-amd64",
    "libvirt-daemon-system", "libvirt-daemon", "libvirt-daemon-driver-qemu",
    "qemu-system-x86", "libvirt-clients", "usbutils", "iproute2", "qemu-guest-agent",
)
# Kernel module trees no lab host needs: most of the image's size.
UNNEEDED_MODULES = (
    "kernel/sound", "kernel/drivers/gpu", "kernel/drivers/media", "kernel/drivers/infiniband",
    "kernel/drivers/net/wireless", "kernel/drivers/net/ethernet", "kernel/drivers/bluetooth",
    "kernel/drivers/isdn", "kernel/drivers/staging", "kernel/drivers/iio",
    "kernel/drivers/scsi", "kernel/fs/ocfs2", "kernel/fs/xfs", "kernel/fs/btrfs",
    "kernel/net/wireless", "kernel/net/mac80211", "kernel/net/bluetooth",
)
# Run inside the new root's directory ($1) by mmdebstrap after the packages are installed.
CUSTOMIZE = r"""
set -e
root="$1"
echo usb-lab > "$root/etc/hostname"
echo 'auth_tcp = "none"' >> "$root/etc/libvirt/libvirtd.conf"
echo 'LIBVIRTD_ARGS=""' > "$root/etc/default/libvirtd"
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
cat > "$root/etc/systemd/network/10-lab.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOF
echo '/dev/vda / ext4 rw,noatime 0 1' > "$root/etc/fstab"
chroot "$root" systemctl enable systemd-networkd libvirtd.socket libvirtd-tcp.socket
chroot "$root" systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
    systemd-timesyncd.service getty@tty1.service
chroot "$root" passwd -d root
"""
IMAGE_SIZE = "1536M"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "webvirt-usb-lab"
BOOT_SECONDS = 240  # it takes about 30 s on an idle 2-core machine; much longer means broken
GUEST_NAME = "lab-guest"
GUEST_XML = f"""<domain type='qemu'>
  <name>{GUEST_NAME}</name>
  <memory unit='MiB'>96</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='qemu-xhci'/>
  </devices>
</domain>
"""

# What can be plugged: QEMU's emulated USB devices. The keyboard and the mouse share 0627:0001
# (two of a kind); the others have ids of their own. (usb-serial is not among them: with no
# open character device behind it, QEMU never attaches it to the bus.)
DEVICES: dict[str, dict[str, Any]] = {
    "keyboard": {"driver": "usb-kbd", "ids": "0627:0001"},
    "mouse": {"driver": "usb-mouse", "ids": "0627:0001"},
    "storage": {"driver": "usb-storage", "ids": "46f4:0001", "disk": True},
    "smartcard": {"driver": "usb-ccid", "ids": "08e6:4433"},
    "wacom": {"driver": "usb-wacom-tablet", "ids": "056a:0000"},
}


class LabError(Exception):
    """Why the lab could not do what was asked, in one line."""


def say(message: str) -> None:
    print(f"usb-lab: {message}", file=sys.stderr, flush=True)


# Building the image.

def recipe_hash() -> str:
    recipe = json.dumps([RECIPE_VERSION, PACKAGES, UNNEEDED_MODULES, CUSTOMIZE, IMAGE_SIZE])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "root.qcow2"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd))


def apt_sources() -> str:
    """This machine's own apt sources, for mmdebstrap (the same mirror the machine uses)."""
    for candidate in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if Path(candidate).is_file():
            return candidate
    raise LabError("no apt sources found (/etc/apt/sources.list.d/debian.sources)")


@contextlib.contextmanager
def _progress(step: str, expected_s: int) -> Iterator[None]:
    """Says what runs and, every 15 s, that it still does."""
    say(f"{step} (about {expected_s} s)")
    began = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(15):
            say(f"  ... {step}: {time.monotonic() - began:.0f} s")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    say(f"  {step}: done in {time.monotonic() - began:.0f} s")


def _run(command: list[str], log: Path, what: str) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise LabError(f"{what} failed (exit {result.returncode}); see {log}")


def build(cache: Path = DEFAULT_CACHE) -> Image:
    """The cached image for this recipe, built first if needed (as root: about 90 s)."""
    image = Image(cache / recipe_hash())
    if image.complete():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
        if image.complete():
            return image
        for tool in ("mmdebstrap", "qemu-img", "mke2fs"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is missing: apt-get install mmdebstrap qemu-utils")
        if os.geteuid() != 0:
            raise LabError("building the lab image needs root (mmdebstrap, chroot)")
        for old in cache.iterdir():
            if old.is_dir() and old != image.folder:
                shutil.rmtree(old, ignore_errors=True)
        _build(image, cache / "build.log")
    return image


def _build(image: Image, log: Path) -> None:
    log.write_text("")
    say(f"building the lab image once, into {image.folder} (log: {log})")
    with tempfile.TemporaryDirectory(prefix="usb-lab-", dir=image.folder.parent) as work:
        root, raw = Path(work) / "root", Path(work) / "root.img"
        hook = Path(work) / "customize.sh"
        hook.write_text(CUSTOMIZE)
        with _progress("installing Debian packages with mmdebstrap", 75):
            _run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                  f"--customize-hook=sh {hook} \"$1\"", "bookworm", str(root), apt_sources()],
                 log, "mmdebstrap")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise LabError(f"no kernel or initrd in the image; see {log}")
        for modules in (root / "lib/modules").iterdir():
            for tree in UNNEEDED_MODULES:
                shutil.rmtree(modules / tree, ignore_errors=True)
        shutil.rmtree(root / "var/cache/apt", ignore_errors=True)
        shutil.rmtree(root / "usr/share/doc", ignore_errors=True)
        with _progress("writing and compressing the disk image", 30):
            _run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), str(raw), IMAGE_SIZE],
                 log, "mke2fs")
            staging = image.folder.with_name(image.folder.name + ".new")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            _run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw),
                  str(staging / "root.qcow2")], log, "qemu-img convert")
            shutil.copy(kernels[-1], staging / "vmlinuz")
            shutil.copy(initrds[-1], staging / "initrd.img")
            staging.rename(image.folder)  # complete or absent, never half there
    size = sum(p.stat().st_size for p in image.folder.iterdir()) / 2**20
    say(f"image ready: {image.folder} ({size:.0f} MiB)")


# Running it.

@dataclass
class LabState:
    """What a running lab is, written to RUN_DIR/lab.json for the other commands."""
    run_dir: str
    pid: int
    port: int
    qmp: str
    console: str
    plugged: dict[str, str]  # QMP id -> device kind

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"


def default_run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"webvirt-usb-lab-{os.getuid()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _virsh(uri: str, *args: str, seconds: float = 10) -> subprocess.CompletedProcess[str]:
    """virsh with a bound: user-mode networking accepts a connection before the lab host is
    up, and an unbounded call then hangs."""
    try:
        return subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True,
                              timeout=seconds, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {seconds} s")


class Lab:
    """One running lab host."""

    def __init__(self, state: LabState, process: subprocess.Popen[bytes] | None = None):
        self.state = state
        self.process = process  # when this process started it

    @property
    def uri(self) -> str:
        return self.state.uri

    @classmethod
    def up(cls, run_dir: Path | None = None, image: Image | None = None, *,
           tied: bool = False) -> Lab:
        """Boots the lab host from a fresh overlay, waits for its libvirtd, starts lab-guest.
        Raises LabError in one line (with the console log's path) instead of hanging.
        `tied`: the lab host dies with the calling thread (a test run that is killed leaves
        no 1.3 GiB QEMU behind)."""
        image = image or build()
        run_dir = run_dir or default_run_dir()
        existing = cls.find(run_dir)
        if existing is not None:
            raise LabError(f"a lab is already running (pid {existing.state.pid}, {existing.uri});"
                           f" stop it with: scripts/usb-lab down")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        overlay = run_dir / "overlay.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
              str(overlay)], run_dir / "qemu.log", "qemu-img create (the overlay)")
        port, qmp, console = _free_port(), run_dir / "qmp.sock", run_dir / "console.log"
        command = [
            "qemu-system-x86_64", "-name", "webvirt-usb-lab", "-nodefaults", "-display", "none",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=-1",
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-device", "qemu-xhci,id=xhci,p2=8,p3=8",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:16509",
            "-device", "virtio-net-pci,netdev=n0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            # The guest agent: how commands are run in the lab host (Lab.run).
            "-chardev", f"socket,id=qga,path={run_dir / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            "-serial", f"file:{console}", "-no-reboot",
        ]
        with (run_dir / "qemu.log").open("w") as qemu_log:
            process = subprocess.Popen(command, stdout=qemu_log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent if tied else None)
        lab = cls(LabState(str(run_dir), process.pid, port, str(qmp), str(console), {}),
                  process)
        lab._save()
        try:
            lab._wait_for_libvirtd(process)
            lab._start_guest()
        except BaseException:
            lab.down()
            raise
        return lab

    def _wait_for_libvirtd(self, process: subprocess.Popen[bytes]) -> None:
        began = time.monotonic()
        with _progress(f"booting the lab host (console: {self.state.console})", 35):
            while True:
                if process.poll() is not None:
                    raise LabError(f"the lab host's QEMU exited with {process.returncode}; see"
                                   f" {Path(self.state.run_dir) / 'qemu.log'}")
                if _virsh(self.uri, "version", seconds=5).returncode == 0:
                    return
                if time.monotonic() - began > BOOT_SECONDS:
                    raise LabError(f"the lab host's libvirtd did not answer within "
                                   f"{BOOT_SECONDS} s; see {self.state.console}")
                time.sleep(1)

    def _start_guest(self) -> None:
        xml = Path(self.state.run_dir) / "lab-guest.xml"
        xml.write_text(GUEST_XML)
        for args in (("define", str(xml)), ("start", GUEST_NAME)):
            result = _virsh(self.uri, *args, seconds=60)
            if result.returncode != 0:
                raise LabError(f"virsh {args[0]} {GUEST_NAME} failed: "
                               f"{(result.stderr or result.stdout).strip()}")

    @classmethod
    def find(cls, run_dir: Path | None = None) -> Lab | None:
        """The lab running from run_dir, if any."""
        path = (run_dir or default_run_dir()) / "lab.json"
        try:
            state = LabState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        # Its QEMU, not whatever process got that pid after it died without `down`.
        try:
            command_line = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if f"unix:{state.qmp},server=on,wait=off".encode() not in command_line:
            return None
        return cls(state)

    def _save(self) -> None:
        path = Path(self.state.run_dir) / "lab.json"
        path.with_suffix(".tmp").write_text(json.dumps(asdict(self.state)))
        path.with_suffix(".tmp").replace(path)

    def down(self) -> None:
        """Stops the lab host at once (QMP quit: its disk is a throw-away overlay)."""
        with contextlib.suppress(OSError, LabError):
            self.qmp("quit")
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(self.state.pid):
            time.sleep(0.1)
        if _alive(self.state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.state.pid, 9)
        for name in ("overlay.qcow2", "lab.json"):
            (Path(self.state.run_dir) / name).unlink(missing_ok=True)

    def run(self, *argv: str, seconds: float = 60) -> str:
        """Runs a command in the lab host, through its guest agent (e.g. to restart its
        libvirtd); its output, or LabError with it when the command fails."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(seconds)
            sock.connect(str(Path(self.state.run_dir) / "qga.sock"))
            stream = sock.makefile("rw")

            def ask(command: str, **arguments: Any) -> Any:
                stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
                stream.flush()
                while True:  # a reply an earlier caller left behind is skipped
                    line = stream.readline()
                    if not line:
                        raise LabError("the lab host's guest agent closed the connection")
                    reply: dict[str, Any] = json.loads(line)
                    if command != "guest-sync" or reply.get("return") == arguments["id"]:
                        break
                if "error" in reply:
                    raise LabError(f"guest agent {command}: {reply['error'].get('desc')}")
                return reply.get("return")

            ask("guest-sync", id=os.getpid())
            pid = ask("guest-exec", path=argv[0], arg=list(argv[1:]),
                      **{"capture-output": True})["pid"]
            deadline = time.monotonic() + seconds
            while not (status := ask("guest-exec-status", pid=pid))["exited"]:
                if time.monotonic() > deadline:
                    raise LabError(f"{' '.join(argv)} did not end within {seconds} s")
                time.sleep(0.1)
        output = "".join(base64.b64decode(status.get(k, "")).decode(errors="replace")
                         for k in ("out-data", "err-data"))
        if status.get("exitcode") != 0:
            raise LabError(f"{' '.join(argv)} failed ({status.get('exitcode')}): "
                           f"{output.strip()}")
        return output

    # Plugging.

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command; its answer, or LabError with QEMU's reason."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.state.qmp)
            stream = sock.makefile("rw")
            _read_reply(stream)  # the greeting
            for message in ({"execute": "qmp_capabilities"},
                            {"execute": command, "arguments": arguments}):
                stream.write(json.dumps(message) + "\n")
                stream.flush()
                reply = _read_reply(stream)
            if "error" in reply:
                raise LabError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def plug(self, kind: str, device_id: str | None = None, *, port: str | None = None,
             serial: str | None = None) -> str:
        """Plugs an emulated USB device into the lab host; returns its QMP id. `port` is the
        xHCI root port ("1".."4": the lab host's kernel names it 1-PORT)."""
        if kind not in DEVICES:
            raise LabError(f"unknown device {kind!r}; one of: {', '.join(DEVICES)}")
        spec = DEVICES[kind]
        if device_id is None:
            number = 1
            while f"{kind}{number}" in self.state.plugged:
                number += 1
            device_id = f"{kind}{number}"
        if device_id in self.state.plugged:
            raise LabError(f"{device_id} is plugged already")
        arguments: dict[str, Any] = {"driver": spec["driver"], "id": device_id, "bus": "xhci.0"}
        if port is not None:
            arguments["port"] = port
        if serial is not None:
            arguments["serial"] = serial
        if spec.get("disk"):
            with contextlib.suppress(LabError):  # left from an earlier plug of this id
                self.qmp("blockdev-add", driver="null-co", size=1 << 20,
                         **{"node-name": f"{device_id}-disk"})
            arguments["drive"] = f"{device_id}-disk"
        self.qmp("device_add", **arguments)
        self.state.plugged[device_id] = kind
        self._save()
        return device_id

    def unplug(self, device_id: str) -> None:
        """Unplugs a device and waits until QEMU says it is gone."""
        self.qmp("device_del", id=device_id)
        deadline = time.monotonic() + 10
        while any(d.get("name") == device_id for d in self._usb_devices()):
            if time.monotonic() > deadline:
                raise LabError(f"{device_id} was not unplugged within 10 s")
            time.sleep(0.05)
        self.state.plugged.pop(device_id, None)
        self._save()

    def _usb_devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self.qmp("qom-list", path="/machine/peripheral")
        return [d for d in devices if d.get("type", "").startswith("child<usb")]


def _die_with_parent() -> None:
    """In the child: be killed when the thread that started it ends (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _read_reply(stream: Any) -> dict[str, Any]:
    """The next reply on a QMP stream, skipping asynchronous events."""
    while True:
        line = stream.readline()
        if not line:
            raise LabError("QMP: the lab host's QEMU closed the connection")
        message: dict[str, Any] = json.loads(line)
        if "event" not in message:
            return message


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this process counts as gone.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True
