"""The USB lab's own failure modes and cache, without booting it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from support.usb_lab import Image, Lab, LabError, LabState, build, recipe_hash
from tests.processes import REPO


def test_a_boot_that_cannot_work_says_why_in_one_line_with_the_log_path(
        tmp_path: Path) -> None:
    image = Image(tmp_path / "image")
    image.folder.mkdir()
    for part in (image.kernel, image.initrd):
        part.write_bytes(b"not a kernel")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image.disk), "16M"],
                   check=True)
    began = time.monotonic()
    with pytest.raises(LabError) as failure:
        Lab.up(tmp_path / "run", image, tied=True)
    message = str(failure.value)
    assert "\n" not in message
    assert "exited" in message and str(tmp_path / "run" / "qemu.log") in message
    assert time.monotonic() - began < 60  # no waiting out the boot timeout
    assert Lab.find(tmp_path / "run") is None  # nothing left running


def test_a_built_image_is_taken_from_the_cache(tmp_path: Path) -> None:
    image = Image(tmp_path / recipe_hash())
    image.folder.mkdir()
    for part in (image.disk, image.kernel, image.initrd):
        part.write_bytes(b"cached")
    # No mmdebstrap runs (it would need root and minutes): the cached one is it.
    assert build(tmp_path) == image


def test_the_commands_say_what_they_do_and_fail_in_one_line(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "usb-lab"), "--run-dir", str(tmp_path)]
    usage = subprocess.run([*script, "-h"], capture_output=True, text=True, check=True)
    for command in ("build", "up", "plug", "unplug", "status", "run", "down"):
        assert command in usage.stdout
    status = subprocess.run([*script, "status"], capture_output=True, text=True)
    assert status.returncode == 1
    assert status.stderr == "usb-lab: no lab is running; start one with: scripts/usb-lab up\n"


def test_a_lab_json_left_behind_does_not_make_another_process_the_lab(tmp_path: Path) -> None:
    """The lab's QEMU died without `down` (OOM killer, kill -9): its lab.json stays, and a
    later process may get its pid. That process is not the lab, and `down` leaves it alone."""
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        state = LabState(str(tmp_path), bystander.pid, 1, str(tmp_path / "qmp.sock"),
                         str(tmp_path / "console.log"), {})
        (tmp_path / "lab.json").write_text(json.dumps(asdict(state)))
        assert Lab.find(tmp_path) is None
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_device_gets_the_first_free_id_of_its_kind(tmp_path: Path) -> None:
    lab = Lab(LabState(str(tmp_path), 0, 1, str(tmp_path / "no-qmp.sock"),
                       str(tmp_path / "console.log"), {"wacom2": "wacom"}))
    with pytest.raises(OSError):  # it got as far as QMP (there is none here)
        lab.plug("wacom")
    with pytest.raises(OSError):
        lab.plug("wacom", "wacom1")
    with pytest.raises(LabError, match="wacom2 is plugged already"):
        lab.plug("wacom", "wacom2")
