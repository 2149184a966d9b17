"""The USB lab's own failure modes and cache, without booting it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.usb_lab import Image, Lab, LabError, build, recipe_hash
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
    for command in ("build", "up", "plug", "unplug", "status", "down"):
        assert command in usage.stdout
    status = subprocess.run([*script, "status"], capture_output=True, text=True)
    assert status.returncode == 1
    assert status.stderr == "usb-lab: no lab is running; start one with: scripts/usb-lab up\n"
