"""The transition record (a SHA-256 chain on disk) and the diagrams drawn from the rule-book."""

from .record import AuditError, AuditLog, Verdict, timeline, verify

__all__ = ["AuditError", "AuditLog", "Verdict", "timeline", "verify"]
