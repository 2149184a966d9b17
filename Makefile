# Convenience targets; scripts/ hold the set-up commands the README documents.
.PHONY: test demo binary clean

test:
	scripts/test

demo:
	scripts/demo

binary: dist/webvirt

# The single-file executable; copy devices/ next to it.
dist/webvirt: webvirt.spec pyproject.toml $(wildcard webvirt/*.py static/* static/vendor/*)
	scripts/install --test
	.venv/bin/pyinstaller --noconfirm --clean --log-level WARN webvirt.spec

clean:
	rm -rf build dist
