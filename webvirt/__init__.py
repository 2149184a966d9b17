"""webvirt: a small async web server managing libvirt virtual machines."""

from importlib import metadata

try:
    __version__ = metadata.version("webvirt")
except metadata.PackageNotFoundError:  # running from a source tree or a frozen build
    __version__ = "0.3.0"
