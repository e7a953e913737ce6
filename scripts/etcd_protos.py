#!/usr/bin/env python3
"""Copy etcd 3.4's API .proto files from Debian's golang-etcd-server-dev into proto/etcd/.

grpcmux talks to etcd through stubs generated from etcd's own API definitions
(see docs/cluster.rst). The files keep their paths and proto package names (the
gRPC method paths, e.g. ``/etcdserverpb.KV/Range``, depend on the package); only
the gogoproto and google.api (grpc-gateway) annotations are stripped, as they
change nothing on the wire and would need their own .proto files. Run this, then
scripts/gen_protos.py, and commit both results.
"""

import pathlib
import re
import sys

SOURCE = pathlib.Path("/usr/share/gocode/src/go.etcd.io/etcd")
TARGET = pathlib.Path(__file__).resolve().parent.parent / "proto" / "etcd"
FILES = (
    "mvcc/mvccpb/kv.proto",
    "auth/authpb/auth.proto",
    "etcdserver/etcdserverpb/rpc.proto",
)
_IMPORT = re.compile(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', re.M)
_FILE_OPTION = re.compile(r"^option \(gogoproto\.\w+\) = \w+;\n", re.M)
_HTTP_OPTION = re.compile(r"\s*option \(google\.api\.http\) = \{")
_FIELD_OPTION = re.compile(r"\s*\[\(gogoproto\.[^\]]*\]")
_EMPTY_BODY = re.compile(r"\{\s*\}")


def _drop_http_options(text):
    """Remove each ``option (google.api.http) = {...};`` (its braces nest)."""
    while True:
        match = _HTTP_OPTION.search(text)
        if match is None:
            return text
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if text[end] == ";":
            end += 1
        text = text[:match.start()] + text[end:]


def strip(text):
    text = _IMPORT.sub("", text)
    text = _FILE_OPTION.sub("", text)
    text = _drop_http_options(text)
    text = _FIELD_OPTION.sub("", text)
    return _EMPTY_BODY.sub("{}", text)


def main():
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} not found: apt-get install golang-etcd-server-dev")
    for name in FILES:
        text = strip((SOURCE / name).read_text())
        if "gogoproto" in text or "google.api" in text:
            sys.exit(f"{name}: an annotation was left after stripping")
        out = TARGET / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("// Copied from etcd 3.4 by scripts/etcd_protos.py; annotations stripped.\n"
                       + text)


if __name__ == "__main__":
    main()
