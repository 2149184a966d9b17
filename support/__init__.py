"""Helpers shared by tests/ and bench/: webvirt, libvirtd and friends as real processes.

Not part of the webvirt package; bench/ must not import tests/, so these live here.
"""
