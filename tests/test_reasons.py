"""Rejection reasons: one enum in the gateway (uplink.Reason), one table in docs/protocol.md, and
every reason the code can raise is one of them."""
import os
import re

from binlink.gateway.uplink import Reason, Verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_the_protocol_document_lists_exactly_the_reasons_the_gateway_counts():
    doc = _read("docs", "protocol.md")
    section = doc[doc.index("## Rejection reason codes"):]
    section = section[:section.index("\n## ", 1)]
    documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == {r.value for r in Reason}


def test_every_reason_the_code_raises_is_a_reason():
    raised = set()
    for path in (("firmware", "binlink", "wire", "codec.py"), ("gateway", "pipeline.py"), ("gateway", "module_formats.py")):
        text = _read(*path)
        raised |= set(re.findall(r'ProtocolError\("(\w+)"', text))
        raised |= {Reason[name].value for name in re.findall(r"ProtocolError\(Reason\.(\w+)", text)}
        raised |= set(re.findall(r'Reception\(None, "(\w+)"', text)) - {"status"}  # a status line is no rejection
    framing = _read("firmware", "binlink", "wire", "framing.py")
    raised |= set(re.findall(r'(?:return |append\()\("(\w+)", ', framing)) - {"frame"}  # "frame": not a rejection
    raised |= {Verdict.REPLAY.value, Verdict.STALE_KEY.value}  # refusals the shared state hands back as reasons
    assert {"crc", "oversize", "bad_tag", "replay", "unknown_device", "bad_line"} <= raised  # the scan finds what it looks for
    assert raised <= {r.value for r in Reason}, raised - {r.value for r in Reason}
