from specdec.v1 import errors_pb2 as _errors_pb2
from specdec.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeItem(_message.Message):
    __slots__ = ("tag", "session_id", "prefix_len", "tokens", "num_tokens", "sampling", "drafter", "traceparent")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    tag: int
    session_id: str
    prefix_len: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: _sampling_pb2.SamplingParams
    drafter: str
    traceparent: str
    def __init__(self, tag: _Optional[int] = ..., session_id: _Optional[str] = ..., prefix_len: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., drafter: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("items", "release_session_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ProposeItem]
    release_session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[ProposeItem, _Mapping]]] = ..., release_session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProposeResult(_message.Message):
    __slots__ = ("tag", "tokens", "draft_probs_f16", "needs_resync", "error", "draft_pass_base_seconds", "draft_row_seconds", "parents")
    TAG_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_F16_FIELD_NUMBER: _ClassVar[int]
    NEEDS_RESYNC_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PASS_BASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ROW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    tag: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_probs_f16: bytes
    needs_resync: bool
    error: _errors_pb2.ItemError
    draft_pass_base_seconds: float
    draft_row_seconds: float
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tag: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., draft_probs_f16: _Optional[bytes] = ..., needs_resync: _Optional[bool] = ..., error: _Optional[_Union[_errors_pb2.ItemError, _Mapping]] = ..., draft_pass_base_seconds: _Optional[float] = ..., draft_row_seconds: _Optional[float] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProposeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ProposeResult, _Mapping]]] = ...) -> None: ...
