"""virtio-balloon (device id 5): inflate/deflate, statistics, free page hinting and free page reporting."""

from memvisor.devices.balloon.device import BalloonDevice, BalloonError
from memvisor.devices.balloon.hinting import HintState

__all__ = ["BalloonDevice", "BalloonError", "HintState"]
