"""Protobuf messages as plain Python values, in the shape of the CLI's ``--json``: proto field
names, enums by name (``"WORKER_STATUS_RUNNING"``), timestamps as RFC 3339 strings, unset
optional and message fields as ``None``, 64-bit integers as ints, maps as dicts. Built from the
descriptor, so fields added to the protos appear by themselves."""

from __future__ import annotations

from typing import Any, Dict

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)  # protobuf < 5.28


def _is_map(field: FieldDescriptor) -> bool:
    mt = field.message_type
    return mt is not None and mt.GetOptions().map_entry


def _has_presence(field: FieldDescriptor) -> bool:
    flag = getattr(field, "has_presence", None)
    if flag is not None:
        return bool(flag)
    return field.message_type is not None or field.containing_oneof is not None


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict(value)
    return value


def to_dict(msg: Message) -> Any:
    """``msg`` as dicts, lists and scalars (a Timestamp as its RFC 3339 string)."""
    desc: Descriptor = msg.DESCRIPTOR
    if desc.full_name in (_TIMESTAMP, _DURATION):
        return msg.ToJsonString()
    out: Dict[str, Any] = {}
    for field in desc.fields:
        value = getattr(msg, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _scalar(value_field, value[k]) for k in sorted(value)}
        elif _is_repeated(field):
            out[field.name] = [_scalar(field, v) for v in value]
        elif _has_presence(field) and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _scalar(field, value)
    return out
