"""Bytes of Flower messages: raw array bytes, protobuf wire size, and the object-store view."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from collafuse_flwr.comm import array_nbytes, message_nbytes, recorddict_nbytes

# Fixed overhead allowed on top of the raw bytes: numpy's 128-byte .npy header plus keys,
# dtype, shape and protobuf tags.
SMALL_OVERHEAD = 300


def _message(content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(metadata=meta, content=content)


def _one_array(n: int = 1000) -> RecordDict:
    return RecordDict({"uploads": ArrayRecord({"x_tc": Array(np.arange(n, dtype=np.float32))})})


def test_known_array_message():
    rd = _one_array()
    assert array_nbytes(rd) == 4000
    wire = recorddict_nbytes(rd)
    assert 4000 <= wire < 4000 + SMALL_OVERHEAD
    msg = message_nbytes(_message(rd))
    assert wire < msg < wire + SMALL_OVERHEAD  # + metadata


def test_wire_size_grows_with_content():
    rd = _one_array()
    base = recorddict_nbytes(rd)
    rd["config"] = ConfigRecord({"cut-ratio": 0.2, "dataset": "digits"})
    with_config = recorddict_nbytes(rd)
    assert with_config > base
    rd["metrics"] = MetricRecord({"loss": 0.5})
    assert recorddict_nbytes(rd) > with_config
    assert array_nbytes(rd) == 4000  # configs and metrics are not arrays
    # 1000 more float32s add exactly their 4000 bytes (length prefixes stay 2-byte varints).
    assert recorddict_nbytes(_one_array(2000)) - base == 4000


def test_array_bytes_follow_dtype_and_all_records():
    rd = RecordDict({
        "model": ArrayRecord(torch_state_dict={"w": torch.zeros(10, 10, dtype=torch.float16),
                                               "b": torch.zeros(10, dtype=torch.float64)}),
        "uploads": ArrayRecord({"x": Array(np.zeros((2, 1, 4, 4), dtype=np.uint8))}),
    })
    assert array_nbytes(rd) == 10 * 10 * 2 + 10 * 8 + 2 * 16
    assert array_nbytes(RecordDict()) == 0


def test_object_transport_counts_identical_chunks_once():
    a = np.zeros(1000, dtype=np.float32)
    rd = RecordDict({"arrays": ArrayRecord({"x": Array(a), "y": Array(a.copy())})})
    proto = recorddict_nbytes(rd)
    objects = recorddict_nbytes(rd, transport="objects")
    assert proto >= 8000  # protobuf carries both copies
    assert 4000 < objects < 8000  # the object store sends the shared chunk once
    single = recorddict_nbytes(_one_array(), transport="objects")
    assert 4000 < single < 4000 + 1000  # object headers carry SHA-256 ids
    assert message_nbytes(_message(_one_array()), transport="objects") > single


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="transport must be one of"):
        recorddict_nbytes(_one_array(), transport="grpc")
    with pytest.raises(TypeError, match="RecordDict"):
        recorddict_nbytes({"x": 1})
    with pytest.raises(TypeError, match="Message"):
        message_nbytes(_one_array())
