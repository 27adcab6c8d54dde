"""softprompt.serve.metrics: the Prometheus text exposition format (counters, histograms, gauges, escaping)."""

from __future__ import annotations

from softprompt.serve.metrics import Metrics


def test_prometheus_text_format() -> None:
    m = Metrics()
    m.counter("req_total", "Requests.")
    m.histogram("lat_seconds", "Latency.", [0.1, 1.0])
    m.gauge("depth", "Queue depth.", lambda: 3)
    m.inc("req_total", {"task": 'a"b\\c\nd', "code": "200"})
    m.inc("req_total", {"task": 'a"b\\c\nd', "code": "200"}, 2)
    for v in (0.05, 0.1, 0.5, 5.0):
        m.observe("lat_seconds", v, {"task": "x"})
    text = m.render()
    assert "# TYPE req_total counter" in text and "# TYPE lat_seconds histogram" in text
    assert 'req_total{code="200",task="a\\"b\\\\c\\nd"} 3' in text
    assert 'lat_seconds_bucket{task="x",le="0.1"} 2' in text  # le: upper bound inclusive
    assert 'lat_seconds_bucket{task="x",le="1"} 3' in text
    assert 'lat_seconds_bucket{task="x",le="+Inf"} 4' in text
    assert 'lat_seconds_count{task="x"} 4' in text and 'lat_seconds_sum{task="x"} 5.65' in text
    assert "depth 3" in text and text.endswith("\n")
    assert m.value("lat_seconds", {"task": "x"}) == 4
