"""hsmfsm: PKCS#11 slot connections as explicit state machines, recovered by YAML policies."""
