"""``python -m bench perf pretrain`` (methods.vlp.perf): small, CPU-only, one thread."""
from __future__ import annotations

import math

from methods.vlp.perf import perf_pretrain, time_mgca_loss


def test_perf_pretrain_one_method_and_the_mgca_loss():
    r = perf_pretrain(methods=("convirt",), batch_size=4, steps=1, warmup=0, device="cpu", threads=1,
                      repeats=1, mgca_batch=4)
    assert r["threads"] == 1 and r["torch"] and r["cpu_preset"] == "tiny"
    (row,) = r["cpu_methods"]
    assert "error" not in row, row
    assert row["method"] == "convirt" and row["batch"] == 4
    assert row["pairs/s"] > 0 and row["s/step"] > 0
    assert row["peak MiB"] > 0 and row["peak growth MiB"] >= 0
    assert row["x convirt/pair"] == 1.0 and row["x image tower"] > 0
    assert r["mgca_loss"][0]["device"] == "cpu" and r["mgca_loss"][0]["grads finite"]

    m = time_mgca_loss(batch=6, patches=16, words=12, repeats=2, threads=1)
    assert m["seconds"] > 0 and m["forward_s"] > 0 and m["repeats"] == 2
    assert math.isfinite(m["loss"]) and m["grads_finite"]
    assert set(m["terms"]) == {"ita", "tca_word", "tca_patch", "cpa"}
