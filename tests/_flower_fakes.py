"""Stand-ins for Flower's message layer, for the server's tests in-process (tests/test_flower.py,
tests/test_flower_trust.py): a Grid whose nodes answer with Python functions, and sites that answer
the query, train and evaluate messages."""

from __future__ import annotations

import json

import numpy as np


class _Reply:
    def __init__(self, node: int, content) -> None:
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(src_node_id=node)
        self.content = content
        self.error = SimpleNamespace(reason=str(content)) if isinstance(content, Exception) else None

    def has_error(self) -> bool:
        return self.error is not None


class _Msg:
    def __init__(self, content=None, dst_node_id=None, message_type=None, **_) -> None:
        self.content, self.dst_node_id, self.message_type = content, dst_node_id, message_type


class _Grid:
    """Stands in for Flower's Grid: each node answers with a Python function."""

    def __init__(self, nodes) -> None:
        self.nodes = nodes
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, msgs, timeout=None):
        for m in msgs:
            self.sent.append((m.dst_node_id, m.message_type))
            try:
                content = self.nodes[m.dst_node_id](m.message_type, m.content)
            except Exception as exc:  # noqa: BLE001 - a ClientApp error becomes an error reply
                content = exc
            yield _Reply(m.dst_node_id, content)


def _fp_body(n: int) -> dict:
    return {"fingerprint": {
        "spacings": [[3.0, 1.0, 1.0]] * n, "shapes_after_crop": [[10, 20, 20]] * n,
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 10.0, "std": 2.0, "min": 0.0, "percentile_00_5": 1.0, "median": 10.0,
            "percentile_99_5": 19.0, "max": 20.0}},
        "median_relative_size_after_cropping": 1.0},
        "dataset": {"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"},
        "num_cases": n}


def _site(name: str, n: int, delta: float, claim: int | None = None):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from oarbench.train.flower import record_to_weights, weights_to_record

    def answer(kind: str, content):
        if kind == "query":
            return RecordDict({"fingerprint": ConfigRecord({"site": name, "message": json.dumps(_fp_body(n))})})
        if kind == "train":
            w = {k: (v + delta).astype(v.dtype) if v.dtype.kind == "f" else v
                 for k, v in record_to_weights(content["global"]).items()}
            return RecordDict({"update": weights_to_record(w),
                               "metrics": MetricRecord({"num-cases": claim if claim is not None else n})})
        return RecordDict({"model": MetricRecord({"written": 1})})

    return answer


def _steps():
    from oarbench.train.flower import ServerSteps

    def write_model(plans, header, final, st):
        (st.out / "model").mkdir(exist_ok=True)
        return st.out / "model"

    return ServerSteps(plan=lambda merged, header, st: {"n": header["numTraining"]},
                       initial=lambda plans, header, st: {"w": np.ones(4, np.float32), "k": np.array([1], np.int64)},
                       write_model=write_model)
