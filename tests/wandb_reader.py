"""Read back what W&B wrote offline: the run file is a LevelDB-style log of protobuf Records.

wandb 0.31 no longer ships a Python reader, so this is the format's reader in 30 lines
(header ':W&B' + magic + version, then 32 KiB blocks of CRC/length/type-framed chunks).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"not a W&B run file ({ident!r})"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            yield buf + chunk


def read_run(run_file: Path) -> dict:
    """{'run': {group, display_name, config}, 'history': [rows], 'summary': {...}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": {}, "history": [], "summary": {}}
    for raw in _chunks(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            out["run"] = {"group": record.run.run_group, "name": record.run.display_name, "config": config}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for i in record.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
