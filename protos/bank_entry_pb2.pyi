from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightMap(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("png", "raw_uint8", "height", "width", "channels")
    PNG_FIELD_NUMBER: _ClassVar[int]
    RAW_UINT8_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    raw_uint8: bytes
    height: int
    width: int
    channels: int
    def __init__(self, png: _Optional[bytes] = ..., raw_uint8: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class BankEntry(_message.Message):
    __slots__ = ("image_id", "label_id", "teacher_version", "augmentation", "raw_scores", "normalized_scores", "ensemble", "level", "weights", "image", "created_at_ms", "teacher_q_min", "ladder_alphas", "ladder_levels")
    class RawScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class NormalizedScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORES_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_Q_MIN_FIELD_NUMBER: _ClassVar[int]
    LADDER_ALPHAS_FIELD_NUMBER: _ClassVar[int]
    LADDER_LEVELS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    label_id: str
    teacher_version: int
    augmentation: str
    raw_scores: _containers.ScalarMap[str, float]
    normalized_scores: _containers.ScalarMap[str, float]
    ensemble: float
    level: float
    weights: WeightMap
    image: Image
    created_at_ms: int
    teacher_q_min: float
    ladder_alphas: _containers.RepeatedScalarFieldContainer[float]
    ladder_levels: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, image_id: _Optional[str] = ..., label_id: _Optional[str] = ..., teacher_version: _Optional[int] = ..., augmentation: _Optional[str] = ..., raw_scores: _Optional[_Mapping[str, float]] = ..., normalized_scores: _Optional[_Mapping[str, float]] = ..., ensemble: _Optional[float] = ..., level: _Optional[float] = ..., weights: _Optional[_Union[WeightMap, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., created_at_ms: _Optional[int] = ..., teacher_q_min: _Optional[float] = ..., ladder_alphas: _Optional[_Iterable[float]] = ..., ladder_levels: _Optional[_Iterable[float]] = ...) -> None: ...
