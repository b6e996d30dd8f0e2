"""The project's own HSM lab: SoftHSM tokens, network HSMs, and a reply-rewriting relay."""

from .hsm import LabError, NetworkHSM, SoftHSMToken, find_module

__all__ = ["LabError", "NetworkHSM", "SoftHSMToken", "find_module"]
