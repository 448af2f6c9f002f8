"""Will a config fit, and how fast will it step? Memory, FLOPs, bytes and a roofline step time
per device, from the config alone, on a host without the target GPUs (scripts/estimate.py)."""

from framework.estimate.cards import CARDS, Card, card, for_device_kind
from framework.estimate.estimate import Estimate, estimate
from framework.estimate.report import answer, as_data, as_text, oom_advice

__all__ = [
    "CARDS",
    "Card",
    "Estimate",
    "answer",
    "as_data",
    "as_text",
    "card",
    "estimate",
    "for_device_kind",
    "oom_advice",
]
