"""Communication cost measured from the Flower messages themselves, not from parameter counts.

Three views, none with gRPC/HTTP/TLS framing: `array_nbytes` (raw tensor bytes, the number papers
quote); transport="proto" (Flower's protobuf serialization: arrays, keys, configs, metrics, metadata);
transport="objects" (what Flower >= 1.20 pushes: content-addressed objects, each sent once).
"""

import math
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import message_to_proto, recorddict_to_proto

try:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
except ImportError:  # the object store moved (transport="objects" then says so)
    get_all_nested_objects = None

Transport = Literal["proto", "objects"]
TRANSPORTS = ("proto", "objects")


def _raw_nbytes(arr: Array) -> int:
    try:
        return math.prod(arr.shape) * np.dtype(arr.dtype).itemsize
    except TypeError:  # a dtype name numpy does not know (custom serializer): decode it
        return int(arr.numpy().nbytes)


def array_nbytes(rd: RecordDict) -> int:
    """Raw bytes of every array in the RecordDict's ArrayRecords (no headers, no keys)."""
    if not isinstance(rd, RecordDict):
        raise TypeError(f"array_nbytes expects a flwr.app.RecordDict, got {type(rd).__name__}")
    return sum(_raw_nbytes(arr) for rec in rd.values() if isinstance(rec, ArrayRecord) for arr in rec.values())


def _nbytes(obj: Message | RecordDict, kind: type, name: str, transport: str, to_proto) -> int:
    if not isinstance(obj, kind):
        raise TypeError(f"{name} expects a flwr.app.{kind.__name__}, got {type(obj).__name__}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "proto":
        return int(to_proto(obj).ByteSize())
    if get_all_nested_objects is None:
        raise RuntimeError("transport='objects' needs flwr.supercore.inflatable (Flower >= 1.20); use 'proto'")
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def recorddict_nbytes(rd: RecordDict, transport: Transport = "proto") -> int:
    """Serialized size of a RecordDict (the content of one Flower message)."""
    return _nbytes(rd, RecordDict, "recorddict_nbytes", transport, recorddict_to_proto)


def message_nbytes(msg: Message, transport: Transport = "proto") -> int:
    """Serialized size of a whole Flower message: metadata, content or error."""
    return _nbytes(msg, Message, "message_nbytes", transport, message_to_proto)
