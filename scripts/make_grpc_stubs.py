"""Regenerate serving/jaxinfer/v1/inference_pb2*.py from serving/proto (needs grpcio-tools).

    python scripts/make_grpc_stubs.py

The generated files are committed; CI checks they match the .proto.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "serving" / "proto"
OUT = ROOT / "serving" / "gen"


def main(out: pathlib.Path = OUT) -> int:
    from grpc_tools import protoc

    out.mkdir(exist_ok=True)
    proto = PROTO_ROOT / "jaxinfer" / "v1" / "inference.proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}",
                        f"--pyi_out={out}", f"--grpc_python_out={out}", str(proto)])
    if code:
        return code
    # protoc writes `from jaxinfer.v1 import ...`; make it relative to serving/gen.
    grpc_file = out / "jaxinfer" / "v1" / "inference_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(r"^from jaxinfer\.v1 import inference_pb2", "from serving.gen.jaxinfer.v1 import inference_pb2",
                  text, flags=re.M)
    grpc_file.write_text(text)
    for d in (out, out / "jaxinfer", out / "jaxinfer" / "v1"):
        (d / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
