"""The largest request each RPC takes, in bytes of its encoded message (for a streaming upload,
of each message). A request over it is refused before it is decoded, so it costs no work; gRPC
itself refuses anything over MAX_REQUEST_BYTES before reading it whole."""

from __future__ import annotations

DEFAULT_REQUEST_BYTES = 256 * 1024
REQUEST_BYTES = {
    # 1,000 users; a profile holds at most 256 KB, so a batch of large profiles is smaller.
    "/herald.segmentation.v1.SegmentationService/UpsertUsers": 4 << 20,
    "/herald.segmentation.v1.SegmentationService/IngestEvents": 1 << 20,
    # Each message of the stream: up to 10,000 rows.
    "/herald.segmentation.v1.SegmentationService/UploadList": 2 << 20,
}
# Methods whose handlers refuse a NUL in each string field of the request themselves, naming the
# field, as they read it: for a batch of events, the interceptor's walk of every field (needed
# whenever a request holds a zero byte, as every encoded number with zero bytes does) costs more
# than the rest of the checks.
CHECKS_OWN_TEXT = frozenset({"/herald.segmentation.v1.SegmentationService/IngestEvents"})
MAX_REQUEST_BYTES = max(DEFAULT_REQUEST_BYTES, *REQUEST_BYTES.values())
# What gRPC reads at most: a little over the largest limit, so that a request just over its limit
# gets INVALID_ARGUMENT naming it, and one far over is RESOURCE_EXHAUSTED without being read.
GRPC_RECEIVE_BYTES = MAX_REQUEST_BYTES + 64 * 1024


# Calls a replica serves at once (gRPC answers RESOURCE_EXHAUSTED past it), and of them, how
# many bytes of requests of the heavy methods (the largest requests, each turned into many Python
# objects) are worked on at once: two of the largest UpsertUsers, eight of the largest
# IngestEvents, many small ones. The others wait their turn, first come first served, holding only
# their decoded message. So what requests in flight hold is bounded by MAX_CONCURRENT_RPCS
# messages of at most their limit, of which HEAVY_BYTES_AT_ONCE are being worked on
# (tests/test_request_memory.py measures it).
MAX_CONCURRENT_RPCS = 64
HEAVY_METHODS = frozenset(REQUEST_BYTES)
HEAVY_BYTES_AT_ONCE = 8 << 20


def request_limit(method: str) -> int:
    """The largest request message `method` (`/package.Service/Method`) takes."""
    return REQUEST_BYTES.get(method, DEFAULT_REQUEST_BYTES)
