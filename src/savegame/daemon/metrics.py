"""Prometheus metrics of a run: an HTTP endpoint and/or a textfile for node_exporter's collector.

Imported only when `metrics` or `metrics_textfile` is set (prometheus_client is the optional extra
`savegame[metrics]`). Every figure comes from the snapshot the daemon's loop takes once a second
(daemon/counts.py); ages are computed at scrape time. Every metric carries a `run` label, the run
folder's name. The textfile is written atomically (a new file renamed over the old, never through a
link) every few seconds and at the end, so node_exporter never reads half a file.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from savegame.daemon.machine import State
from savegame.errors import ConfigError
from savegame.files import replace_file

log = logging.getLogger("savegame")
TEXTFILE_INTERVAL_S = 5.0
Snapshot = Callable[[], Mapping[str, Any]]


def _gauge(name: str, doc: str, run: str, value: Any, **labels: str) -> Optional[Metric]:
    if value is None:
        return None
    family = GaugeMetricFamily(name, doc, labels=["run", *labels])
    family.add_metric([run, *labels.values()], float(value))
    return family


def _by_label(kind: type, name: str, doc: str, run: str, label: str, values: Mapping[str, float]) -> Metric:
    family = kind(name, doc, labels=["run", label])
    for key, value in sorted(values.items()):
        family.add_metric([run, key], float(value))
    return family


class RunCollector:
    """Turns the daemon's latest snapshot into metric families (called on each scrape)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if s:
            yield from (family for family in self._families(s, s["run"]) if family is not None)

    def _families(self, s: Mapping[str, Any], run: str) -> Iterator[Optional[Metric]]:
        counts, good = s["counts"], s["goodput"]
        yield _gauge("savegame_info", "The run (always 1), with its run id.", run, 1, run_id=str(s["run_id"]))
        yield _by_label(GaugeMetricFamily, "savegame_state", "The daemon's state (1 for the current one).", run,
                        "state", {st.value: float(st.value == s["state"]) for st in State})
        yield _gauge("savegame_worker_up", "1 while a worker trains.", run, int(s["worker_up"]))
        yield _gauge("savegame_attempt", "The worker attempt, counted across the run's daemons.", run, s["attempt"])
        yield _gauge("savegame_worker_step", "The step the worker last reported.", run, s["step"])
        yield from self._checkpoints(counts, run)
        yield from self._mirror(s.get("mirror"), run)
        yield from self._goodput(s, good, run)

    def _checkpoints(self, counts: Mapping[str, Any], run: str) -> Iterator[Optional[Metric]]:
        yield _by_label(CounterMetricFamily, "savegame_checkpoints_committed", "Checkpoints committed, by reason.",
                        run, "reason", counts["committed"])
        yield _by_label(CounterMetricFamily, "savegame_checkpoints_failed", "Saves that failed, by reason.", run,
                        "reason", counts["failed"])
        yield _by_label(CounterMetricFamily, "savegame_checkpoints_pruned", "Checkpoints deleted by retention, "
                        "by tier.", run, "tier", counts["pruned"])
        written = CounterMetricFamily("savegame_checkpoints_written_bytes", "Bytes of committed checkpoints.",
                                      labels=["run"])
        written.add_metric([run], counts["bytes"])
        yield written
        commit = SummaryMetricFamily("savegame_checkpoint_commit_seconds", "From a save's start to its commit.",
                                     labels=["run"])
        commit.add_metric([run], count_value=counts["commit_s"][0], sum_value=counts["commit_s"][1])
        yield commit
        last = counts["last_commit"]
        yield _gauge("savegame_last_checkpoint_step", "The step of the newest commit.", run, last.get("step"))
        yield _gauge("savegame_last_checkpoint_timestamp_seconds", "When the newest commit was made.", run,
                     last.get("time"))
        yield _gauge("savegame_last_checkpoint_age_seconds", "Seconds since the newest commit.", run,
                     max(0.0, time.time() - last["time"]) if last.get("time") else None)
        yield _gauge("savegame_last_checkpoint_size_bytes", "Bytes of the newest commit.", run, last.get("bytes"))

    def _mirror(self, mirror: Optional[Mapping[str, Any]], run: str) -> Iterator[Optional[Metric]]:
        if not mirror:
            return
        yield _gauge("savegame_mirror_lag_seconds", "How far the bucket is behind the newest commit.", run,
                     mirror["lag_s"])
        yield _gauge("savegame_mirror_pending_checkpoints", "Checkpoints waiting to be uploaded.", run,
                     mirror["pending"])
        yield _gauge("savegame_mirror_confirmed_step", "The newest step the bucket holds.", run,
                     mirror["confirmed_step"])
        yield _gauge("savegame_mirror_missing_checkpoints", "Steps the bucket lacked at the last flush.", run,
                     mirror["missing"])

    def _goodput(self, s: Mapping[str, Any], good: Mapping[str, Any], run: str) -> Iterator[Optional[Metric]]:
        stall = SummaryMetricFamily("savegame_checkpoint_stall_seconds", "Training time spent saving.",
                                    labels=["run"])
        stall.add_metric([run], count_value=good["saves"], sum_value=s["stall_s"])
        yield stall
        yield _by_label(CounterMetricFamily, "savegame_restarts", "Worker restarts, by cause.", run, "cause",
                        good["restarts"])
        for name, doc, value in (("savegame_preemptions", "Preemptions (notices, the scheduler's signal).",
                                  good["preemptions"]),
                                 ("savegame_work_lost_steps", "Steps done again after a death.", good["lost_steps"]),
                                 ("savegame_work_lost_seconds", "Training time done again after a death.",
                                  s["lost_s"])):
            family = CounterMetricFamily(name, doc, labels=["run"])
            family.add_metric([run], float(value))
            yield family
        yield _by_label(GaugeMetricFamily, "savegame_time_seconds", "Where the run's time went (goodput's parts).",
                        run, "category", {**good["seconds"], "down": good["down_s"]})
        yield _gauge("savegame_goodput_ratio", "Productive training time / the daemons' lifetimes.", run,
                     good["goodput"])


class MetricsExporter:
    def __init__(self, address: Optional[str], textfile: Optional[str], run: str, snapshot: Snapshot) -> None:
        self.address = address
        self.textfile = textfile.replace("{run}", run) if textfile else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RunCollector(snapshot))  # type: ignore[arg-type]
        self._server: Any = None
        self.url: Optional[str] = None  # where the endpoint listens (status.json: metrics_url)
        self._written_at = 0.0

    def start(self) -> None:
        """Listen (a port taken or not allowed is a configuration error: exit 78)."""
        if self.textfile and not os.path.isdir(os.path.dirname(self.textfile) or "."):
            raise ConfigError(f"metrics_textfile: the folder of {self.textfile} does not exist")
        if self.address:
            host, _, port = self.address.rpartition(":")
            try:
                self._server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
            except OSError as exc:
                raise ConfigError(f"metrics = {self.address!r}: cannot listen there: {exc.strerror or exc}") from None
            bound = self._server.server_address[1]  # the port the OS chose, for port 0
            self.url = f"http://{host}:{bound}/metrics"
            log.info("metrics on %s", self.url)

    def tick(self, snapshot: Mapping[str, Any]) -> None:
        if self.textfile and snapshot and time.monotonic() - self._written_at >= TEXTFILE_INTERVAL_S:
            self.write_textfile()

    def write_textfile(self) -> None:
        assert self.textfile is not None
        self._written_at = time.monotonic()
        try:
            replace_file(self.textfile, generate_latest(self.registry))
        except OSError as exc:
            log.warning("cannot write the metrics textfile %s: %s", self.textfile, exc)

    def close(self, snapshot: Mapping[str, Any]) -> None:
        if self.textfile and snapshot:
            self.write_textfile()  # the final state, for whoever scrapes it after the run
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
