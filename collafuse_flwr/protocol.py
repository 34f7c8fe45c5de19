"""The wire protocol between the strategies (server) and a node (ClientApp): every message action,
record, array, config key and reply field, named once (tests/test_protocol.py fails on a literal
elsewhere). Actions: `query.hello` (first contact; a node that does not serve the method refuses and
is never admitted), `train.<method>`, `evaluate.<method>`. Records are checked against
`ALLOWED_RECORDS` where they enter (both sides): one nobody asked for is refused, not ignored.
"""

import math
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType

# -- actions ------------------------------------------------------------------------------------
COLLAFUSE, FEDAVG, LOCAL, CENTRALIZED = "collafuse", "fedavg", "local", "centralized"
METHODS = (COLLAFUSE, FEDAVG, LOCAL, CENTRALIZED)
#: what a deployed node serves unless its operator says otherwise: they never send its data or models
PRIVATE_METHODS = (COLLAFUSE, LOCAL)
HELLO = "hello"
TRAIN, EVALUATE, QUERY = MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY


def message_type(category: str, action: str) -> str:
    """Flower's routed message type, e.g. ("train", "collafuse") -> "train.collafuse"."""
    return f"{category}.{action}"


# -- error codes of the node's Error replies (Flower leaves codes >= 100 to apps) ---------------------
REFUSED = 403  # a request the node refuses (its policy, a malformed or out-of-range value)
FAILED = 500  # a request the node failed on (its own fault)

# -- records and arrays ---------------------------------------------------------------------------
CONFIG = "config"  # ConfigRecord: what the server asks (server -> node)
METRICS = "metrics"  # MetricRecord: counts, timings, losses, scores (node -> server)
ARRAYS = "arrays"  # FedAvg's global model (down) / the node's locally trained copy (up)
UPLOAD = "upload"  # what a node uploads in training
HANDOFF = "handoff"  # CollaFuse evaluation: the server's x_{t_c} for the node to finish
GENERATED = "generated"  # centralized evaluation: images the server generated for the node
SAMPLES = "samples"  # generated images a node returns (research harness only)
HARNESS = "harness"  # disclosure harness: the server's reconstructions, for the node to score

X_TC = "x_tc"  # array: CollaFuse cut images (upload and hand-off)
X0 = "x0"  # array: raw images (centralized reference only)
IMAGES = "images"  # array: uint8 images (generated / samples)
UPLOADS = "uploads"  # array in HARNESS: the node's last upload, echoed for upload FID
RECON_SERVER, RECON_SCALED, RECON_REFERENCE = "recon-server", "recon-scaled", "recon-reference"
#: the only arrays a node scores (in its last upload's shape), so the scores cannot become an oracle
RECON_NAMES = (RECON_SERVER, RECON_SCALED, RECON_REFERENCE)

# -- server -> node config keys ------------------------------------------------------------------
SERVER_ROUND, NUM_CLIENTS = "server-round", "num-clients"
CLIENT_INDEX = "client-index"  # the server-assigned slot (a conditional shared model's label)
RUN_KEY = "run-key"  # which run's private state a node continues (a resumed run keeps the first id)
CUT_STEP = "cut-step"  # collafuse: the node's declared cut (a request for another one is refused)
UPLOADS_ASKED = "uploads"  # collafuse: x_tc images asked for this round
NUM_SAMPLES = "num-samples"  # evaluation: images to generate
FINAL_ROUND = "final-round"  # evaluation: the run's last (the node then drops its run state)
CLIENT_START_STEP = "client-start-step"  # evaluation: where the node's chain starts
CLIENT_SAMPLING_STEPS = "client-sampling-steps"  # evaluation: DDIM steps (0 = ancestral)
METHOD = "method"  # hello: the method the server wants to run

# -- node -> server reply fields (metrics) ------------------------------------------------------------
PARTITION_ID = "partition-id"  # hello: the slot the node claims (a claim, checked by the server)
NUM_EXAMPLES = "num-examples"
IMAGE_CHANNELS = "image-channels"  # hello: channels of the node's images (the server's model must match)
UPLOAD_BUDGET = "upload-budget"  # hello: most uploads per round
UPLOADS_LEFT = "uploads-left"  # hello/train: uploads the node's lifetime cap still allows
SHARE_HARNESS = "share-harness"  # hello: 1 = the node returns research measurements
CLIENT_PARAMS = "client-params"  # parameters of the model the node runs
TRAIN_LOSS = "train-loss"  # only where the node's policy shares losses (they are data-dependent)
NUM_UPLOADED, TRAIN_SECONDS, INFER_SECONDS = "num-uploaded", "train-seconds", "infer-seconds"
CLIENT_TRAIN_FLOPS, CLIENT_INFER_FLOPS_PER_IMAGE = "client-train-flops", "client-infer-flops-per-image"
CHECKSUM = "checksum"  # mean of the generated images (harness: detects non-finite samples)
FID, KID, KID_STD, PRECISION, RECALL = "fid", "kid", "kid-std", "precision", "recall"
FID_SKIPPED = "fid-skipped"  # 1 = too few test images for a meaningful FID on this node
EPSILON = "epsilon"  # harness: epsilon of the uploads' own noise (no formal guarantee)
MAX_UPLOADS_PER_IMAGE = "max-uploads-per-image"
DISCLOSURE_PREFIX = "disclosure-"  # harness scores: disclosure-{psnr,ssim,reid}-<recon>, ...
DP_PREFIX = "dp-"  # hello/train: the node's DP plan (dp.DPPlan.metrics)

# -- node_config keys: what a node's operator sets (the simulation sets partition-id, num-partitions) ----
NODE_NUM_PARTITIONS, NODE_DATA_DIR, NODE_DATASET, NODE_STATE_DIR = "num-partitions", "data-dir", "dataset", "state-dir"
NODE_METHODS = "methods"  # comma-separated methods this node serves
NODE_TRUST = "trust-run-config"  # true: unset privacy keys follow the run-config (simulation default)
NODE_CUT_RATIO = "cut-ratio"  # noise floor, as c on the node's reference schedule
NODE_UPLOAD_NOISE = "upload-noise"  # noise floor, as the least std sqrt(1 - abar) of an upload
NODE_UPLOADS_PER_ROUND = "uploads-per-round"
NODE_MAX_UPLOADS = MAX_UPLOADS_PER_IMAGE  # lifetime cap per image (with or without DP)
NODE_EPSILON, NODE_DELTA, NODE_CLIP = "upload-epsilon", "upload-delta", "upload-clip"
NODE_MAX_SAMPLES, NODE_TEST_FRACTION = "max-samples", "test-fraction"
NODE_SHARE_HARNESS, NODE_PARTITION_ID = SHARE_HARNESS, PARTITION_ID
NODE_KEYS = (NODE_PARTITION_ID, NODE_NUM_PARTITIONS, NODE_DATA_DIR, NODE_DATASET, NODE_STATE_DIR,
             NODE_METHODS, NODE_TRUST, NODE_CUT_RATIO, NODE_UPLOAD_NOISE, NODE_UPLOADS_PER_ROUND,
             NODE_MAX_UPLOADS, NODE_EPSILON, NODE_DELTA, NODE_CLIP, NODE_MAX_SAMPLES, NODE_TEST_FRACTION,
             NODE_SHARE_HARNESS)

#: every name that travels in a message (no other module spells one: tests/test_protocol.py)
WIRE_NAMES = frozenset(v for k, v in dict(globals()).items()
                       if k.isupper() and isinstance(v, str) and not k.startswith("NODE_")
                       and k not in ("TRAIN", "EVALUATE", "QUERY"))

#: Records each (direction, category, method) may carry; anything else is refused.
#: "down" = server -> node, "up" = node -> server.
ALLOWED_RECORDS: dict[tuple[str, str, str], frozenset[str]] = {
    ("down", QUERY, HELLO): frozenset({CONFIG}), ("up", QUERY, HELLO): frozenset({METRICS}),
    ("down", TRAIN, COLLAFUSE): frozenset({CONFIG}), ("up", TRAIN, COLLAFUSE): frozenset({METRICS, UPLOAD}),
    ("down", EVALUATE, COLLAFUSE): frozenset({CONFIG, HANDOFF, HARNESS}),
    ("up", EVALUATE, COLLAFUSE): frozenset({METRICS, SAMPLES}),
    ("down", TRAIN, FEDAVG): frozenset({CONFIG, ARRAYS}), ("up", TRAIN, FEDAVG): frozenset({METRICS, ARRAYS}),
    ("down", EVALUATE, FEDAVG): frozenset({CONFIG, ARRAYS}), ("up", EVALUATE, FEDAVG): frozenset({METRICS, SAMPLES}),
    ("down", TRAIN, LOCAL): frozenset({CONFIG}), ("up", TRAIN, LOCAL): frozenset({METRICS}),
    ("down", EVALUATE, LOCAL): frozenset({CONFIG}), ("up", EVALUATE, LOCAL): frozenset({METRICS, SAMPLES}),
    ("down", TRAIN, CENTRALIZED): frozenset({CONFIG}), ("up", TRAIN, CENTRALIZED): frozenset({METRICS, UPLOAD}),
    ("down", EVALUATE, CENTRALIZED): frozenset({CONFIG, GENERATED}),
    ("up", EVALUATE, CENTRALIZED): frozenset({METRICS, SAMPLES}),
}


class ProtocolError(ValueError):
    """A message does not follow the protocol (missing, mistyped or out-of-range field)."""


def unexpected_records(msg: Message, direction: str, category: str, action: str) -> list[str]:
    """Names of the records in `msg` that its (direction, category, action) does not allow."""
    allowed = ALLOWED_RECORDS.get((direction, category, action))
    if allowed is None:
        return sorted(msg.content.keys()) or ["<unknown action>"]
    return sorted(set(msg.content.keys()) - allowed)


def read_int(conf: ConfigRecord | dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    """`conf[key]` as an int in [lo, hi], else ProtocolError naming the key: the server's values are
    untrusted (a float, a bool, 1e6 as a round or a missing key are refused where they enter)."""
    if key not in conf:
        if default is None:
            raise ProtocolError(f"'{key}' is missing from the server's config")
        return default
    v = conf[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or int(v) != v:
        raise ProtocolError(f"'{key}' must be an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise ProtocolError(f"'{key}'={int(v)} is outside {lo}..{hi}")
    return int(v)
