"""Every python-pkcs11 error maps to its CKR name and value."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pkcs11
import pkcs11.exceptions as exc
import pytest
from hsmfsm.core.codes import CKR, code_from_name, name_of
from hsmfsm.p11.codes import PSEUDO, code_of


def _installed_table() -> list[tuple[str, str, str]]:
    pxd = Path(pkcs11.__file__).with_name("_pkcs11.pxd")
    if not pxd.exists():
        pytest.skip("python-pkcs11 ships no _pkcs11.pxd to compare with")
    text = pxd.read_text()
    body = text[text.index("cdef inline object map_rv_to_error"):]
    return re.findall(r'rv == (CKR_\w+):\s*\n\s*exc = (\w+)\((.*?)\)\n', body)


def test_every_mapped_class_round_trips_to_its_ckr():
    table = _installed_table()
    assert len(table) >= 70
    for name, cls_name, arg in table:
        error = getattr(exc, cls_name)(*([arg.strip('"')] if arg else []))
        code = code_of(error)
        assert code.name == name and code.value == CKR[name], (name, cls_name, code)


def test_every_exception_class_of_python_pkcs11_is_known():
    classes = [c for _, c in inspect.getmembers(exc, inspect.isclass)
               if issubclass(c, exc.PKCS11Error) and c is not exc.PKCS11Error]
    for cls in classes:
        code = code_of(cls())
        assert code.name != "HSMFSM_UNKNOWN_ERROR", cls
        assert code.name in CKR or code.name in PSEUDO, (cls, code)


def test_vendor_and_unmapped_codes_keep_their_number():
    code = code_of(exc.PKCS11Error("Unmapped error code 0x80000123"))
    assert (code.name, code.value) == ("CKR_VENDOR_DEFINED+0x123", 0x80000123)
    code = code_of(exc.PKCS11Error("Unmapped error code 0x1"))
    assert (code.name, code.value) == ("CKR_CANCEL", 1)
    assert code_of(exc.PKCS11Error("Initialisation error (not initialized). Should never see this.")).name \
        == "CKR_CRYPTOKI_NOT_INITIALIZED"
    assert code_of(RuntimeError("something else")).name == "HSMFSM_UNKNOWN_ERROR"


@pytest.mark.parametrize("text,value", [("CKR_PIN_LOCKED", 0xA4), ("0x80000001", 0x80000001),
                                        ("CKR_VENDOR_DEFINED+16", 0x80000010), ("CKR_0x00000FFF", 0xFFF)])
def test_policy_spellings_parse(text, value):
    code = code_from_name(text)
    assert code.value == value and code_from_name(code.name) == code
    assert name_of(value) == code.name


def test_unknown_names_are_refused():
    with pytest.raises(KeyError):
        code_from_name("CKR_DEVICE_EROR")
