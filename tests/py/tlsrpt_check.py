#!/usr/bin/env python3
"""Checks a TLS-RPT report message (RFC 8460 §5.3) read from a file: its MIME structure and
headers, and its gzip-compressed JSON against a JSON Schema written from RFC 8460 §4.4
(jsonschema). Prints the JSON on success; exits 1 with the reason otherwise.

usage: tlsrpt_check.py MESSAGE_FILE
"""
import email
import email.policy
import gzip
import json
import sys

import jsonschema

COUNT = {"type": "integer", "minimum": 0}
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object",
            "required": ["start-datetime", "end-datetime"],
            "properties": {
                "start-datetime": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
                "end-datetime": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
            },
        },
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["policy", "summary"],
                "properties": {
                    "policy": {
                        "type": "object",
                        "required": ["policy-type", "policy-domain"],
                        "properties": {
                            "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                            "policy-string": {"type": "array", "items": {"type": "string"}},
                            "policy-domain": {"type": "string", "minLength": 1},
                            "mx-host": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "summary": {
                        "type": "object",
                        "required": ["total-successful-session-count", "total-failure-session-count"],
                        "properties": {
                            "total-successful-session-count": COUNT,
                            "total-failure-session-count": COUNT,
                        },
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["result-type", "failed-session-count"],
                            "properties": {
                                "result-type": {"enum": [
                                    "starttls-not-supported", "certificate-host-mismatch",
                                    "certificate-expired", "certificate-not-trusted",
                                    "validation-failure", "tlsa-invalid", "dnssec-invalid",
                                    "dane-required", "sts-policy-fetch-error",
                                    "sts-policy-invalid", "sts-webpki-invalid",
                                ]},
                                "sending-mta-ip": {"type": "string"},
                                "receiving-mx-hostname": {"type": "string"},
                                "receiving-mx-helo": {"type": "string"},
                                "receiving-ip": {"type": "string"},
                                "failed-session-count": COUNT,
                                "additional-information": {"type": "string"},
                                "failure-reason-code": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def fail(why):
    print(why)
    sys.exit(1)


msg = email.message_from_binary_file(open(sys.argv[1], "rb"), policy=email.policy.default)
if msg.get_content_type() != "multipart/report" or msg.get_param("report-type") != "tlsrpt":
    fail(f"not multipart/report; report-type=tlsrpt: {msg.get_content_type()}")
for h in ["TLS-Report-Domain", "TLS-Report-Submitter"]:
    if not msg[h]:
        fail(f"no {h}")
if not msg["Subject"].startswith("Report Domain: "):
    fail(f"subject {msg['Subject']!r}")
parts = [p for p in msg.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
if len(parts) != 1:
    fail("no application/tlsrpt+gzip part")
name = parts[0].get_filename() or ""
if not name.endswith(".json.gz") or name.count("!") < 3:
    fail(f"file name {name!r}")
report = json.loads(gzip.decompress(parts[0].get_content()))
try:
    jsonschema.validate(report, SCHEMA)
except jsonschema.ValidationError as e:
    fail(f"schema: {e.message}")
print(json.dumps(report, separators=(",", ":")))
