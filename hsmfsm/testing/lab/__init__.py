"""The project's own HSM lab: SoftHSM tokens, network HSMs, and a reply-rewriting relay."""

from .hsm import LabError, NetworkHSM, SoftHSMToken, find_module
from .relay import Relay

__all__ = ["LabError", "NetworkHSM", "Relay", "SoftHSMToken", "find_module"]
