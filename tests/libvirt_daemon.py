"""The private libvirtd lives in support/ (bench/ uses it too); tests may import it here."""

from support.libvirt_daemon import LibvirtDaemon, guest_xml

__all__ = ["LibvirtDaemon", "guest_xml"]
