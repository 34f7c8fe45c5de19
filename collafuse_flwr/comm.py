"""Communication cost measured from the Flower messages themselves, not from parameter counts.

Why: CollaFuse's uplink is images x_{t_c} plus whatever configs and metrics ride along, FedAvg's
is a full model; comparing them fairly means counting what Flower serializes. Three views:

* ``array_nbytes``: raw tensor bytes (numel x itemsize) in the ArrayRecords, the number papers
  usually quote.
* ``transport="proto"`` (default): size of Flower's own protobuf serialization
  (``flwr.common.serde.recorddict_to_proto`` / ``message_to_proto``, ``.ByteSize()``): array
  bytes plus numpy headers, keys, dtypes, shapes, configs, metrics and message metadata.
* ``transport="objects"``: what Flower 1.2x+ actually pushes between SuperNode and SuperLink:
  the message deflated into content-addressed objects (Message, RecordDict, records, Arrays,
  ArrayChunks of <= 5 MiB), each with a header carrying its children's SHA-256 ids; objects
  with the same id are sent once, so repeated identical chunks are counted once.

Neither protocol view includes gRPC/HTTP/TLS framing.
"""

from __future__ import annotations

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


def _object_nbytes(obj: Message | RecordDict) -> int:
    if get_all_nested_objects is None:  # the object store moved: fall back to the documented proto view
        raise RuntimeError("transport='objects' needs flwr.supercore.inflatable (Flower >= 1.20); "
                           "use transport='proto'")
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def _check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")


def recorddict_nbytes(rd: RecordDict, transport: Transport = "proto") -> int:
    """Serialized size of a RecordDict (the content of one Flower message)."""
    if not isinstance(rd, RecordDict):
        raise TypeError(f"recorddict_nbytes expects a flwr.app.RecordDict, got {type(rd).__name__}")
    _check_transport(transport)
    if transport == "objects":
        return _object_nbytes(rd)
    return int(recorddict_to_proto(rd).ByteSize())


def message_nbytes(msg: Message, transport: Transport = "proto") -> int:
    """Serialized size of a whole Flower message: metadata, content or error."""
    if not isinstance(msg, Message):
        raise TypeError(f"message_nbytes expects a flwr.app.Message, got {type(msg).__name__}")
    _check_transport(transport)
    if transport == "objects":
        return _object_nbytes(msg)
    return int(message_to_proto(msg).ByteSize())
