"""No PIN anywhere: after a run with a wrong-PIN member, scan every output hsmfsm produces.

The token gets a PIN that cannot occur by accident (not ``1234``, which a
timestamp or a hash could contain), and a member is given a wrong PIN that
is just as distinctive. Then the logs (every logger, DEBUG), the audit
record, the diagrams, the reprs, the exception messages and ``hsmfsm
status`` are searched for either.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from hsmfsm import HSMError, SlotConnection
from hsmfsm.audit import diagram
from hsmfsm.config.pool_file import load_pool
from hsmfsm.runtime.pool import Pool, format_status
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken

from conftest import sign_ec, wait_for

RIGHT = "Qx7-pin-4Vw"
WRONG = "Wr0ng-pin-8Zk"


@pytest.fixture(scope="module")
def secret_token(tmp_path_factory) -> SoftHSMToken:
    return SoftHSMToken(tmp_path_factory.mktemp("secret") / "master", label="pin-scan", pin=RIGHT).provision()


def test_no_pin_in_logs_records_diagrams_reprs_errors_or_status(secret_token, client_module, tmp_path,
                                                               monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SCAN_PIN", RIGHT)
    monkeypatch.setenv("SCAN_WRONG_PIN", WRONG)
    a = NetworkHSM(secret_token.replicate(tmp_path / "a"), tmp_path / "a.sock").start()
    b = NetworkHSM(secret_token.replicate(tmp_path / "b"), tmp_path / "b.sock").start()
    outputs: dict[str, str] = {}
    try:
        pool_path = tmp_path / "pool.yaml"
        pool_path.write_text(f"""\
pool: scan
policy:
  extends: network-hsm
  name: scan
  operations: {{deadline: 2s, call_timeout: 1s}}
recovery: {{mode: background, interval: 200ms, max_attempts: 3}}
audit: {{path: audit/transitions.jsonl}}
members:
  - name: good
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{a.address}"}}
    token_label: pin-scan
    pin: env:SCAN_PIN
  - name: wrong-pin
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{b.address}"}}
    token_label: pin-scan
    pin: env:SCAN_WRONG_PIN
""")
        errors: list[BaseException] = []
        spec = load_pool(str(pool_path))
        with Pool.from_spec(spec) as pool:
            assert wait_for(lambda: pool.member("wrong-pin").state == "failed", 10)
            for i in range(5):
                sign_ec(pool, b"scan %d" % i)
            a.kill()  # now nobody can serve: the caller gets AllMembersDown, which names every member
            with pytest.raises(HSMError) as info:
                sign_ec(pool, b"nobody")
            errors.append(info.value)
            status = pool.status()
            outputs["status"] = format_status(pool) + json.dumps([s.as_dict() for s in status])
            outputs["reprs"] = " ".join(repr(x) for x in (pool, spec, spec.policy, *spec.members,
                                                          pool.member("good"), pool.member("wrong-pin"), pool.audit))
            diagram.write_pool(spec, tmp_path / "live.dot", status)
            diagram.write_pool(spec, tmp_path / "live.svg", status)
        by_name = {s.name: s for s in status}
        assert by_name["wrong-pin"].state == "failed" and by_name["wrong-pin"].last_code == "CKR_PIN_INCORRECT"
        # A wrong PIN met directly, outside a pool, is an error too.
        direct = SlotConnection(client_module, "pin-scan", "env:SCAN_WRONG_PIN", spec.policy, name="direct",
                                env={"P11_KIT_SERVER_ADDRESS": b.address})
        with pytest.raises(HSMError) as info:
            direct.open()
        errors.append(info.value)
        outputs["reprs"] += repr(direct)
        direct.close()
        a.start()
        cli = subprocess.run([sys.executable, "-m", "hsmfsm", "-v", "status", str(pool_path)],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ))
        outputs["hsmfsm status"] = cli.stdout + cli.stderr
        assert "wrong-pin" in cli.stdout and "CKR_PIN_INCORRECT" in cli.stdout, cli.stdout + cli.stderr
    finally:
        a.kill()
        b.kill()
    outputs["errors"] = " ".join(f"{e} {e!r} {e.__cause__!r}" for e in errors)
    outputs["logs"] = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    outputs["audit"] = "".join(p.read_text() for p in sorted((tmp_path / "audit").iterdir()))
    outputs["diagrams"] = (tmp_path / "live.dot").read_text() + (tmp_path / "live.svg").read_text()
    # The scan means something only if the wrong PIN really was tried and everything was captured.
    assert "CKR_PIN_INCORRECT" in outputs["audit"] and "CKR_PIN_INCORRECT" in outputs["logs"]
    assert "wrong-pin" in outputs["diagrams"] and "CKR_PIN_INCORRECT" in outputs["status"]
    assert "AllMembersDown" in outputs["errors"] and "LoginRejected" in outputs["errors"], outputs["errors"]
    for where, text in outputs.items():
        assert text, where
        assert RIGHT not in text, f"the PIN appears in {where}"
        assert WRONG not in text, f"the wrong PIN appears in {where}"
