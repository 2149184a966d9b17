"""The Stream Deck plugin's USB key on the USB lab: a real plug, a real guest; a press hands the
device to the guest, the next takes it back, and the key follows each within 1.5 s."""

from __future__ import annotations

import time

import pytest

from support.usb_lab import GUEST_NAME, Lab
from tests.conftest import ClientFactory, DeckFactory
from tests.streamdeck_app import USB
from tests.test_streamdeck import url_of
from tests.test_usb_lab import event_stream, plugged

pytestmark = pytest.mark.usb_lab


async def test_a_usb_key_hands_a_plugged_device_over_and_takes_it_back(
        usb_lab: Lab, make_client: ClientFactory, make_deck: DeckFactory) -> None:
    client = await make_client(uri=usb_lab.uri)
    deck = await make_deck(url_of(client))
    async with event_stream(client, "host") as ws:
        await plugged(ws, usb_lab, "wacom")
    key = await deck.appear(USB, {"domain": GUEST_NAME, "vendor_id": "056a",
                                  "product_id": "0000", "label": "PenPartner"})
    await deck.shows(key, "PenPartner", "not here", seconds=10)
    for expected in ("attached", "not here"):
        mark = deck.mark()
        began = time.monotonic()
        await deck.press(key)
        shown = await deck.shows(key, expected, seconds=10, after=mark)
        assert not [m for m in deck.sent[mark:] if m.event == "showAlert"], deck.log_tail()
        print(f"press to {expected}: {shown.at - began:.2f} s")
        assert shown.at - began < 1.5
