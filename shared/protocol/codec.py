"""Codec helpers, record keys, the site spec and the plan of the federation protocol.

Every payload is a frozen dataclass with ``to_record()`` and ``from_record()``; decoding is strict
(exact record and key sets, schema version, dtypes, ranks, finite floats) and raises
``ProtocolError`` with a short reason. Plan-dependent checks (shapes against the plan, label ids,
byte budgets) live in ``server/validation.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.errors import ConfigError, ProtocolError
from shared.privacy.spec import DPSpec

# 2: validation split, validation scores + privacy audit; 3: FedProx mu in the pretrain request, local-only scores in
# the evaluate reply; 4: count input in the profile, per-class library statistics in the distill reply; 5: DP settings
# in the spec, the DP report in the distill reply; 6: keep-optimizer and balanced-heads in the pretrain request; 7: the
# class-means pretrain stage; 8: the plan's DP center; 9: fine-tuned scores in the evaluate reply; 10: the MLP training
# rule in the evaluate request; 11: SCAFFOLD's control variates in the pretrain request and reply; 12: the audit's
# chance bounds in the evaluate reply; 13: whether DP sites release library statistics (none under statistics
# pretraining)
SCHEMA_VERSION = 13
MSG_PROFILE = "query.profile"
MSG_PRETRAIN = "train.pretrain"
MSG_DISTILL = "train.distill"
MSG_EVALUATE = "evaluate.models"
MESSAGE_TYPES = (MSG_PROFILE, MSG_PRETRAIN, MSG_DISTILL, MSG_EVALUATE)

SCHEMA_KEY = "schema-version"
KEY_CONFIG = "config"  # ConfigRecord of every payload
KEY_METRICS = "metrics"  # MetricRecord of replies
KEY_SPEC = "site-spec"  # ConfigRecord: how a site prepares its data
KEY_PLAN = "plan"  # ConfigRecord: spec + classes of the plan
KEY_PLAN_GENES = "plan-genes"  # ArrayRecord: the plan's gene names (utf-8 bytes)
KEY_STATS = "site-stats"  # ArrayRecord: per-gene and per-label aggregates
KEY_WEIGHTS = "weights"
KEY_ENCODER = "encoder-weights"
KEY_CONTROL = "control-variates"  # ArrayRecord: SCAFFOLD's server variate (request), a site's change of its own (reply)
KEY_VAE = "vae-weights"
KEY_SCDG = "scdg-weights"
KEY_MLP = "mlp-weights"
KEY_LOGREG = "logreg"
KEY_LATENT = "latent-stats"
KEY_CLASS_MEANS = "class-means"  # ArrayRecord: a site's released per-class gene means and cell counts (DP)
KEY_CODES = "codes"
KEY_DISTILL = "distill-config"  # ConfigRecord: DistillConfig fields
KEY_SYNTHETIC = "synthetic"
KEY_WARM = "warm-codes"  # ArrayRecord: a site's own codes of the previous round (server -> that site)

Stage = Literal["vae", "latent-stats", "scdg", "class-means"]
STAGES: tuple[Stage, ...] = ("vae", "latent-stats", "scdg", "class-means")
EVALUATORS = ("mlp", "logreg", "knn")
ABSENT = -1.0  # wire value of a missing non-negative metric (NaN in Python)
ABSENT_CORR = -2.0  # wire value of a missing correlation
_SEP = "\n"
T = TypeVar("T")
StateDict = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- helpers
def fail(where: str, what: str) -> ProtocolError:
    """A ProtocolError naming the payload and what is wrong."""
    return ProtocolError(f"{where}: {what}")


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``values`` stamped with the schema version."""
    return ConfigRecord({SCHEMA_KEY: SCHEMA_VERSION, **values})


def check_records(
    rd: RecordDict, where: str, *, arrays: Iterable[str] = (), configs: Iterable[str] = (), metrics: Iterable[str] = ()
) -> None:
    """Check that rd holds exactly the named records, of the right kinds, with our schema version."""
    if not isinstance(rd, RecordDict):
        raise fail(where, f"expected a RecordDict, got {type(rd).__name__}")
    kinds = {
        **{k: ArrayRecord for k in arrays},
        **{k: ConfigRecord for k in configs},
        **{k: MetricRecord for k in metrics},
    }
    missing, extra = sorted(set(kinds) - set(rd.keys())), sorted(set(rd.keys()) - set(kinds))
    if missing or extra:
        raise fail(where, f"records differ from the schema (missing {missing}, unexpected {extra})")
    for name, kind in kinds.items():
        if not isinstance(rd[name], kind):
            raise fail(where, f"record {name!r} is a {type(rd[name]).__name__}, expected {kind.__name__}")
        if kind is ConfigRecord and rd[name].get(SCHEMA_KEY) != SCHEMA_VERSION:
            raise fail(
                where,
                f"record {name!r} has schema version {rd[name].get(SCHEMA_KEY)!r}, expected {SCHEMA_VERSION}; "
                "update fedscdd on both sides",
            )


def array_record(rd: RecordDict, key: str) -> ArrayRecord:
    """``rd[key]``, typed as the ArrayRecord that ``check_records`` found it to be."""
    return cast(ArrayRecord, rd[key])


def check_keys(record: Mapping[str, Any], expected: Iterable[str], where: str) -> None:
    """Refuse missing and unexpected keys."""
    exp = set(expected)
    missing, extra = sorted(exp - set(record)), sorted(set(record) - exp)
    if missing or extra:
        raise fail(where, f"keys differ from the schema (missing {missing}, unexpected {extra})")


def get_value(record: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    """Scalar of exactly type ``kind`` (bool is not an int; ints are accepted as floats); floats finite."""
    v = record[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise fail(where, f"{key!r} is {type(v).__name__}, expected {kind.__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise fail(where, f"{key!r} is not finite")
    return v


def get_float_list(record: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    """A list of finite numbers."""
    v = record[key]
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise fail(where, f"{key!r} must be a list of numbers")
    if not all(math.isfinite(x) for x in v):
        raise fail(where, f"{key!r} holds non-finite values")
    return tuple(float(x) for x in v)


def get_str_list(record: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """A non-empty list of strings."""
    v = record[key]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise fail(where, f"{key!r} must be a non-empty list of strings")
    return tuple(v)


def get_array(
    record: ArrayRecord, key: str, dtype: str, ndim: int, where: str, *, allow_nan: bool = False
) -> np.ndarray:
    """The numpy array under ``key``, refusing other dtypes, ranks and non-finite floats (NaN allowed with
    ``allow_nan``: "absent")."""
    try:
        arr = record[key].numpy()
    except Exception as exc:  # noqa: BLE001 - any decode failure is a protocol error
        raise fail(where, f"array {key!r} cannot be decoded ({type(exc).__name__})") from None
    if arr.dtype != np.dtype(dtype):
        raise fail(where, f"array {key!r} has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != ndim:
        raise fail(where, f"array {key!r} has {arr.ndim} dimensions, expected {ndim}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) | (allow_nan & np.isnan(arr))):
        raise fail(where, f"array {key!r} holds {'Inf' if allow_nan else 'NaN or Inf'}")
    return arr


def encode_strings(names: Iterable[str]) -> np.ndarray:
    """Names -> uint8 array of newline-joined UTF-8 (names must not contain newlines)."""
    names = list(names)
    if any(_SEP in n for n in names):
        msg = "names must not contain newlines"
        raise ProtocolError(msg)
    return np.frombuffer(_SEP.join(names).encode("utf-8"), dtype=np.uint8).copy()


def decode_strings(arr: np.ndarray, where: str) -> tuple[str, ...]:
    """Inverse of ``encode_strings``; refuses empty lists, undecodable bytes and duplicates."""
    try:
        names = tuple(arr.tobytes().decode("utf-8").split(_SEP)) if arr.size else ()
    except UnicodeDecodeError:
        raise fail(where, "names are not valid UTF-8") from None
    if not names or len(set(names)) != len(names) or "" in names:
        raise fail(where, "names must be non-empty, unique and not blank")
    return names


def state_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A state dict (name -> array) as an ArrayRecord, order kept."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def state_from_record(record: ArrayRecord, where: str) -> StateDict:
    """ArrayRecord -> state dict of finite float arrays (any rank)."""
    out: StateDict = {}
    for k in record:
        arr = record[k].numpy()
        out[k] = get_array(record, k, str(arr.dtype), arr.ndim, where) if arr.dtype.kind == "f" else arr
    return out


def wire_bytes(content: RecordDict) -> int:
    """Bytes the content occupies on the wire: every serialised object of its tree, data chunks included."""
    total, stack = 0, [content]
    while stack:
        obj = stack.pop()
        total += len(obj.deflate())
        stack.extend((getattr(obj, "children", None) or {}).values())
    return total


def nan_to_wire(v: float, absent: float = ABSENT) -> float:
    """NaN/Inf -> the wire's absent marker."""
    return absent if not math.isfinite(v) else float(v)


def wire_to_nan(v: float, absent: float = ABSENT) -> float:
    """The wire's absent marker -> NaN."""
    return float("nan") if v == absent else v


# ----------------------------------------------------------------------------- site spec and plan
@dataclass(frozen=True)
class SiteSpec:
    """How every site reads and splits its data (same for all sites of a run)."""

    label_key: str = "cell_type"
    expect: str = "auto"
    min_cells_per_class: int = 2
    test_fraction: float = 0.2
    split_seed: int = 0
    min_coverage: float = 0.5
    val_fraction: float = 0.1
    dp: DPSpec = field(default_factory=DPSpec)  # cell-level differential privacy (off by default)

    def data_items(self) -> dict[str, Any]:
        """The items that decide how a site prepares its cells (its data cache key)."""
        return {
            "label-key": self.label_key,
            "expect": self.expect,
            "min-cells-per-class": self.min_cells_per_class,
            "test-fraction": float(self.test_fraction),
            "split-seed": self.split_seed,
            "min-coverage": float(self.min_coverage),
            "val-fraction": float(self.val_fraction),
        }

    def items(self) -> dict[str, Any]:
        """Wire items of the spec."""
        return {**self.data_items(), **self.dp.items()}

    @classmethod
    def parse(cls, rec: Mapping[str, Any], where: str) -> SiteSpec:
        """Decode and range-check a spec record."""
        spec = cls(
            label_key=get_value(rec, "label-key", str, where),
            expect=get_value(rec, "expect", str, where),
            min_cells_per_class=get_value(rec, "min-cells-per-class", int, where),
            test_fraction=get_value(rec, "test-fraction", float, where),
            split_seed=get_value(rec, "split-seed", int, where),
            min_coverage=get_value(rec, "min-coverage", float, where),
            val_fraction=get_value(rec, "val-fraction", float, where),
            dp=_dp_spec(rec, where),
        )
        fractions_ok = (
            0 <= spec.test_fraction < 1 and 0 <= spec.val_fraction < 1 and spec.test_fraction + spec.val_fraction < 1
        )
        if spec.expect not in ("auto", "counts", "lognorm") or spec.min_cells_per_class < 1 or not fractions_ok:
            raise fail(
                where,
                "site spec out of range (expect, min-cells-per-class >= 1, "
                "test-fraction and val-fraction in [0, 1) with a sum below 1)",
            )
        return spec


def _dp_spec(rec: Mapping[str, Any], where: str) -> DPSpec:
    try:
        return DPSpec.from_items(rec, lambda r, k, t: get_value(r, k, t, where))
    except ConfigError as exc:
        raise fail(where, str(exc)) from None


SPEC_KEYS = {SCHEMA_KEY, *SiteSpec().items()}


@dataclass(frozen=True)
class Plan:
    """The run's gene vocabulary, label vocabulary and data spec, sent with every training message."""

    genes: tuple[str, ...]
    classes: tuple[str, ...]
    spec: SiteSpec = field(default_factory=SiteSpec)
    # Under DP with released class means: every gene's mean over all sites' cells, from their DP profiles (public
    # within the run). Sites center their cells on it before clipping (``client.privacy.class_gene_sums``). Empty
    # otherwise.
    center: tuple[float, ...] = ()

    def digest(self) -> str:
        """Short SHA-256 of the plan (cache keys, warm-start checks, the DP ledger's class-means entry)."""
        parts: list[Any] = [self.genes, self.classes, self.spec.items()]
        if self.center:
            parts.append([float(v) for v in self.center])
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def records(self) -> dict[str, ConfigRecord | ArrayRecord]:
        """Return the plan's two records."""
        arrays = {"names": Array(encode_strings(self.genes))}
        if self.center:
            arrays["center"] = Array(np.asarray(self.center, np.float64))
        return {
            KEY_PLAN: config_record({**self.spec.items(), "classes": list(self.classes)}),
            KEY_PLAN_GENES: ArrayRecord(arrays),
        }

    @classmethod
    def from_records(cls, rd: RecordDict, where: str) -> Plan:
        """Decode the plan's records (caller checked the record set)."""
        rec = rd[KEY_PLAN]
        check_keys(rec, SPEC_KEYS | {"classes"}, where)
        arrays = array_record(rd, KEY_PLAN_GENES)
        check_keys(arrays, {"names", "center"} if "center" in arrays else {"names"}, where)
        genes = decode_strings(get_array(arrays, "names", "uint8", 1, where), where)
        classes = get_str_list(rec, "classes", where)
        if len(set(classes)) != len(classes):
            raise fail(where, "plan classes are not unique")
        center: tuple[float, ...] = ()
        if "center" in arrays:
            values = get_array(arrays, "center", "float64", 1, where)
            if values.shape != (len(genes),) or not (np.isfinite(values).all() and (values >= 0).all()):
                raise fail(where, f"plan center must be {len(genes)} finite non-negative values, got {values.shape}")
            center = tuple(float(v) for v in values)
        return cls(genes=genes, classes=classes, spec=SiteSpec.parse(rec, where), center=center)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for plan.json."""
        out: dict[str, Any] = {
            "genes": list(self.genes),
            "classes": list(self.classes),
            "spec": self.spec.items(),
            "digest": self.digest(),
        }
        if self.center:
            out["center"] = [float(v) for v in self.center]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_json``."""
        s = obj["spec"]
        spec = SiteSpec(
            s["label-key"],
            s["expect"],
            int(s["min-cells-per-class"]),
            float(s["test-fraction"]),
            int(s["split-seed"]),
            float(s["min-coverage"]),
            float(s.get("val-fraction", 0.0)),  # plans written before the validation split had none
            DPSpec.from_items(s, lambda r, k, t: t(r[k])) if "dp-epsilon" in s else DPSpec(),
        )  # nor DP settings
        return cls(tuple(obj["genes"]), tuple(obj["classes"]), spec, tuple(float(v) for v in obj.get("center", ())))


PLAN_RECORDS = (KEY_PLAN, KEY_PLAN_GENES)


def check_round(rnd: int, where: str) -> int:
    """A round number (>= 0)."""
    if rnd < 0:
        raise fail(where, f"round must be >= 0, got {rnd}")
    return rnd
