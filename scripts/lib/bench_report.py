#!/usr/bin/env python3
"""The report of a scripts/bench.sh run (standard library only).

scripts/bench.sh runs it once the rounds are done:

    python3 scripts/lib/bench_report.py --results DIR --context FILE [--out DIR]

Inputs:
  --results DIR   the samples. DIR/PATH.METRIC holds one value a line, one line per
                  round (PATH: direct, keyhole, keyhole-portable, keyhole-pool,
                  pgbouncer, stunnel, goproxy; METRIC:
                  tps_s8, copy_out_cpu, ...), and DIR/PATH.METRIC.fail one reason a
                  line, one line per failed round. DIR/cloudsql/KEY.METRIC,
                  DIR/via/KEY.METRIC and DIR/latency/PATH.METRIC likewise for the
                  Cloud SQL, via= and latency groups.
  --context FILE  what bench.sh knows and the samples do not say, as JSON (bench.sh's
                  write_context): the settings, the paths and why any was skipped, the
                  servers each path is measured against, the versions of the servers,
                  clients and proxies, the notes, the Cloud SQL, via= and latency
                  columns, the MySQL-speaking proxies looked for, whether this
                  kernel has kernel TLS (for the line on keyhole portable). Its keys are the
                  fields of Run, CloudSqlGroup, ViaGroup and LatencyGroup below.
  --out DIR       where the files go; without it the markdown report goes to stdout.

Outputs, with --out DIR:
  DIR/bench.md    the markdown report: machine, settings, versions, the tables of
                  medians with their ratios and keyhole's targets, notes, every sample;
  DIR/bench.json  the same, machine-readable: machine, versions, settings, every
                  sample, medians, ratios, targets (scripts/test.sh reads it);
  DIR/bench.png   a chart (gnuplot, from a script written here) of the ratios to
                  direct, the proxies' CPU seconds per GB and their RSS per idle
                  connection, with the targets drawn in; without gnuplot, a warning
                  and no chart;
and on stdout the results tables and a line on the targets. The machine's facts
(cores, CPU, memory, kernel) and the date are read here; SOURCE_DATE_EPOCH, when set,
is the date (to compare two reports of the same samples).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from fnmatch import fnmatchcase

# --- the run --------------------------------------------------------------------


@dataclass
class CloudSqlGroup:
    """The Cloud SQL connector's workloads (bench.sh's cs_* settings)."""

    # the columns that ran, in order (direct@pg keyhole@pg keyhole keyhole-lazy stunnel);
    # none: the group did not run
    keys: list
    note: str  # why it did not run
    notes: list  # what went wrong while setting it up
    clients: int
    instance: str  # the fake instance, PROJECT:REGION:INSTANCE
    api: str  # the fake SQL Admin API's address
    proxy: str  # the fake server-side proxy's address
    cn: str  # the CN of its server certificate


@dataclass
class ViaGroup:
    """The via= workloads (bench.sh's via_* settings)."""

    # the columns that ran, in order (keyhole ssh ssh-L socks5 http); none: the group did not run
    keys: list
    note: str  # why it did not run
    clients: int
    duration: int  # seconds, each pgbench run
    pg_port: int
    commands: dict  # KEY: the command line of the column ("A + B": two processes)
    bastion_command: str  # sshd's command line


@dataclass
class LatencyGroup:
    """The latency workloads: every path over the latency relay (bench.sh's lat_*)."""

    # the columns: loopback (direct without the relay), direct, then the proxies that ran
    # over the relay; none: the group did not run
    keys: list = field(default_factory=list)
    note: str = ""  # why it did not run
    clients: list = field(default_factory=list)  # pgbench -c, each
    delay_ms: str = ""  # the relay's one-way delay, each way, as given
    relay_port: int = 0
    priority: str = ""  # the relay's scheduling
    notes: list = field(default_factory=list)  # what went wrong while setting it up

    def round_trip_ms(self):
        """What the relay adds to a round trip, e.g. 1 (for 0.5 each way)."""
        try:
            return "%g" % (2 * float(self.delay_ms))
        except ValueError:
            return "?"


@dataclass
class Run:
    """What bench.sh knows about the run: its context file."""

    quick: bool
    only: str  # --only GROUPS, or empty
    main: bool  # the main table's workloads ran
    mysql: bool  # MariaDB ran (the MySQL rows)
    rounds: int
    duration: int  # seconds, each pgbench and sysbench run
    pgbench_clients: list
    conn_clients: int
    scale: int
    copy_bytes: int
    stream_bytes: int
    idle_conns: int
    idle_large: int
    mysql_threads: list  # sysbench --threads, each (the last one has keyhole's target)
    mysql_table_size: int
    mysql_bytes: int
    first_runs: int
    rounds_seconds: int  # how long the rounds took
    load_before: str  # /proc/loadavg's first three fields
    load_after: str
    paths: list  # direct first, then the proxies asked for
    servers: dict  # PATH: the servers it is measured against (pg, syn, my)
    skip_notes: dict  # PATH: why it did not run at all
    late_notes: dict  # PATH: what went wrong once it had started
    mysql_note: str
    fd_note: str
    # NAME: its version line; postgres, pgbench, mariadb, mariadb_client, sysbench, each
    # proxy path that ran, ssh, microsocks, tinyproxy
    versions: dict
    cloudsql: CloudSqlGroup
    via: ViaGroup
    latency: LatencyGroup = field(default_factory=LatencyGroup)
    # the MySQL-speaking proxies looked for: PACKAGE: its installation candidate, or
    # empty; and how they were looked for (or why they were not)
    mysql_proxies: dict = field(default_factory=dict)
    mysql_proxies_how: str = ""
    # the pool size of the pooled paths in front of PostgreSQL: pgbouncer's
    # default_pool_size and keyhole pool=session's pool-size (0: not recorded)
    pool_size: int = 0
    # kernel TLS, probed with the keyhole-portable path: available (yes, no, ?, or empty:
    # not probed), probe (what the probe said), asked (keyhole's flags ask for it)
    kernel_tls: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["cloudsql"] = CloudSqlGroup(**data["cloudsql"])
        data["via"] = ViaGroup(**data["via"])
        data["latency"] = LatencyGroup(**data.get("latency", {}))
        # (a context from before the 1-thread MySQL run has one thread count)
        if isinstance(data.get("mysql_threads"), int):
            data["mysql_threads"] = [data["mysql_threads"]]
        return cls(**data)

    def ran(self, path):
        return not self.skip_notes.get(path)

    def version(self, name):
        return self.versions.get(name, "")


@dataclass
class Machine:
    """This machine, as the report describes it."""

    nproc: int
    cpu: str
    memory_gib: str  # "%.1f"
    kernel: str

    @classmethod
    def probe(cls):
        cpu = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    found = re.match(r"model name\s*: (.*)", line)
                    if found:
                        cpu = found.group(1)
                        break
        except OSError:
            pass
        memory = ""
        try:
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        memory = "%.1f" % (int(line.split()[1]) / 1048576)
        except OSError:
            pass
        return cls(len(os.sched_getaffinity(0)), cpu, memory, os.uname().release)


def report_time():
    """Now, or SOURCE_DATE_EPOCH."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    return datetime.datetime.now(datetime.timezone.utc)


def duration_text(seconds):
    """1m05s, or 42s."""
    if seconds >= 60:
        return "%dm%02ds" % (seconds // 60, seconds % 60)
    return "%ds" % seconds


def figure(value, fmt):
    """VALUE, a median, in FMT (%.3f): its 6 decimals as in bench.json, rounded half to
    even (a tie such as 0.1235 is 0.124 on every platform)."""
    decimals = int(fmt[2:-1])
    return format(Decimal("%.6f" % value).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_EVEN), "f")


def mb_text(size):
    """1001 MB (10^6 bytes)."""
    return "%.0f MB" % (size / 1000000)


# --- the samples ----------------------------------------------------------------


def median(values):
    """The median, as bench.sh always kept it: rounded to 6 decimals (None: no values)."""
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    m = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return float("%.6f" % m)


class Samples:
    """A results directory. Names are relative to it: keyhole.tps_s8, via/ssh.via_tps_c."""

    def __init__(self, root):
        self.root = root

    def lines(self, name):
        """The lines of a file (none when it is missing)."""
        try:
            with open(os.path.join(self.root, name), encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        return lines

    def values(self, name):
        return [float(line.split()[0]) for line in self.lines(name) if line.strip()]

    def median(self, name):
        return median(self.values(name))

    def failures(self, name):
        """Why rounds of the workload failed, one reason each."""
        return self.lines(name + ".fail")

    def names(self, pattern, subdir=""):
        """The names of the non-empty files matching PATTERN (in subdir), sorted."""
        directory = os.path.join(self.root, subdir)
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        prefix = subdir + "/" if subdir else ""
        return [
            prefix + entry
            for entry in entries
            if fnmatchcase(entry, pattern)
            and os.path.isfile(os.path.join(directory, entry))
            and os.path.getsize(os.path.join(directory, entry)) > 0
        ]

    def figures(self, pattern, subdir=""):
        """The names of the non-empty sample files matching PATTERN: no .fail file."""
        return [name for name in self.names(pattern, subdir) if not name.endswith(".fail")]


# --- metrics and targets --------------------------------------------------------


@dataclass
class Target:
    """keyhole's target for a metric: ratio>=X, ratio<=X, max<=X, held, sshL>=X, sshL<=X,
    pgbouncer>=X (keyhole pool=session's figure over pgbouncer's, the same run)."""

    kind: str  # ratio, max, held, sshL, pgbouncer
    op: str  # >=, <=, or empty (held)
    limit: str  # the number as written

    @classmethod
    def parse(cls, text):
        if not text:
            return None
        found = re.fullmatch(r"(ratio|max|sshL|pgbouncer)(>=|<=)(.+)", text)
        if found:
            return cls(*found.groups())
        return cls(text, "", "")

    def __str__(self):
        return self.kind + self.op + self.limit

    def text(self):
        """How it reads in a table."""
        return {
            ("ratio", ">="): "≥ %s× direct",
            ("ratio", "<="): "≤ %s× keyhole → PostgreSQL",
            ("max", "<="): "≤ %s",
            ("held", ""): "10,000 held, no error",
            ("sshL", ">="): "via=ssh ≥ %s× ssh -L",
            ("sshL", "<="): "via=ssh ≤ %s× ssh -L",
            ("pgbouncer", ">="): "pool=session ≥ %s× pgbouncer's rate (same run)",
        }.get((self.kind, self.op), "").replace("%s", self.limit)

    def holds(self, value):
        """VALUE (a figure or a ratio) is within the limit."""
        limit = float(self.limit)
        return value >= limit if self.op == ">=" else value <= limit


def ratio_met(target, value, base):
    """yes or no: VALUE / BASE within the target; or - without both."""
    if value is None or base is None:
        return "-"
    return "yes" if base > 0 and target.holds(value / base) else "no"


@dataclass
class Metric:
    """A row of a table: one figure of one workload."""

    id: str  # the samples' METRIC
    label: str
    unit: str
    format: str  # of its value, e.g. %.0f
    kind: str  # ratio: also its ratio to the baseline; delta: its difference to it;
    #            proxy: a proxy's own figure (direct has none); cpu: a proxy's own figure
    #            with its ratio to keyhole's; added: source's median minus the
    #            baseline's, times scale (direct has none); value: the value alone;
    #            pool: keyhole pool=session's median of source over pgbouncer's (only
    #            that column has it)
    target: Target | None = None
    server: str = ""  # main table: the server it is measured against (pg, syn, my)
    columns: tuple = ()  # Cloud SQL and via= tables: the columns that have the figure
    source: str = ""  # added: the metric it is computed from
    scale: float = 1.0  # added: the difference times this (ms to µs: 1000)


# The kinds of rows that are a proxy's own: no direct figure.
PROXY_KINDS = ("proxy", "cpu", "added", "pool")
# The kinds of rows computed from another row's samples (Metric.source).
DERIVED_KINDS = ("added", "pool")
# keyhole pool=session, the pooled keyhole in the main table, and the pooler it is
# measured against.
POOL_PATH, POOLER = "keyhole-pool", "pgbouncer"
# keyhole built for the data path macOS and Windows get (--cfg keyhole_portable): the
# buffered copy instead of splice(2), rustls' record layer instead of kernel TLS.
PORTABLE_PATH = "keyhole-portable"


def pgbench_metrics(clients, server="pg"):
    """pgbench -S -c C: TPS (keyhole's target at -c 8 in the main table), the proxy's CPU
    per transaction, the latency, and at -c 1 the latency added per round trip."""
    rows = [
        Metric("tps_s%d" % clients, "pgbench -S -c %d" % clients, "TPS", "%.0f", "ratio",
               Target.parse("ratio>=0.95" if clients == 8 and server == "pg" else ""), server),
        Metric("cpu_tps_s%d" % clients, "pgbench -S -c %d: proxy CPU (× keyhole)" % clients, "µs/tx", "%.1f",
               "cpu", None, server),
        Metric("lat_tps_s%d" % clients, "pgbench -S -c %d latency" % clients, "ms", "%.3f", "ratio", None, server),
    ]
    if clients == 1:
        rows.append(Metric("added_tps_s1", "pgbench -S -c 1: latency added per round trip", "µs", "%.0f",
                           "added", None, server, source="lat_tps_s1", scale=1000.0))
    return rows


def main_metrics(run):
    """The main table's rows (none without the main group: --only)."""
    if not run.main:
        return []
    rows = []
    for c in run.pgbench_clients:
        rows += pgbench_metrics(c)
    copy_size, stream_size = mb_text(run.copy_bytes), mb_text(run.stream_bytes)
    rows += [
        Metric("tps_c", "pgbench -S -C -c %d: new connections" % run.conn_clients, "per s", "%.0f",
               "ratio", Target.parse("ratio>=1.2"), "pg"),
    ]
    if POOL_PATH in run.paths:
        rows.append(Metric("pool_tps_c", "pgbench -S -C -c %d through keyhole pool=session: its rate over %s's"
                           % (run.conn_clients, POOLER), "× " + POOLER, "%.2f", "pool",
                           Target.parse("pgbouncer>=1"), "pg", source="tps_c"))
    rows += [
        Metric("cpu_tps_c", "pgbench -S -C: proxy CPU per new connection (× keyhole)", "µs/conn", "%.0f",
               "cpu", None, "pg"),
        Metric("lat_tps_c", "pgbench -S -C latency (+ added per new connection)", "ms", "%.3f",
               "delta", None, "pg"),
        Metric("copy_out_mbs", "COPY out, " + copy_size, "MB/s", "%.0f", "ratio", None, "pg"),
        Metric("copy_out_cpu", "COPY out: proxy CPU", "s/GB", "%.2f", "proxy", Target.parse("max<=0.6"), "pg"),
        Metric("copy_in_mbs", "COPY in, " + copy_size, "MB/s", "%.0f", "ratio", None, "pg"),
        Metric("copy_in_cpu", "COPY in: proxy CPU", "s/GB", "%.2f", "proxy", None, "pg"),
        Metric("syn_mbs", "synthetic TLS stream, " + stream_size, "MB/s", "%.0f", "ratio", None, "syn"),
        Metric("syn_cpu", "synthetic stream: proxy CPU", "s/GB", "%.2f", "proxy", None, "syn"),
        Metric("rss_pg", "idle: RSS per connection, %d to PostgreSQL" % run.idle_conns, "KiB", "%.1f",
               "proxy", Target.parse("max<=16"), "pg"),
        Metric("rss_syn", "idle: RSS per connection, %d to synthetic" % run.idle_large, "KiB", "%.1f",
               "proxy", Target.parse("held"), "syn"),
    ]
    if run.mysql:
        for threads in run.mysql_threads:
            # (the last thread count's samples are my_tps, my_lat, my_cpu; 1 thread's my_*_t1)
            last = threads == run.mysql_threads[-1]
            suffix = "" if last else "_t%d" % threads
            name = "%d thread%s" % (threads, "" if threads == 1 else "s")
            rows += [
                Metric("my_tps" + suffix, "MySQL point selects (sysbench, %s)" % name, "TPS", "%.0f",
                       "ratio", Target.parse("ratio>=0.95" if last else ""), "my"),
                Metric("my_cpu" + suffix, "MySQL point selects, %s: proxy CPU (× keyhole)" % name, "µs/query",
                       "%.1f", "cpu", None, "my"),
                Metric("my_lat" + suffix, "MySQL point select latency, %s" % name, "ms", "%.3f", "ratio", None,
                       "my"),
            ]
        rows += [
            Metric("my_bulk_mbs", "MySQL bulk read, " + mb_text(run.mysql_bytes), "MB/s", "%.0f", "ratio",
                   None, "my"),
            Metric("my_bulk_cpu", "MySQL bulk read: proxy CPU", "s/GB", "%.2f", "proxy", None, "my"),
        ]
    return rows


def cloudsql_metrics(run):
    """The Cloud SQL table's rows; ratios and deltas are to keyhole@pg."""
    if not run.cloudsql.keys:
        return []
    c, cc = run.cloudsql.clients, run.conn_clients
    return [
        Metric("cs_tps_s8", "pgbench -S -c %d" % c, "TPS", "%.0f", "ratio",
               columns=("direct@pg", "keyhole@pg", "keyhole", "stunnel")),
        Metric("cs_cpu_s8", "pgbench -S -c %d: proxy CPU per transaction" % c, "µs", "%.1f", "ratio",
               Target.parse("ratio<=1.1"), columns=("keyhole@pg", "keyhole", "stunnel")),
        Metric("cs_fake_s8", "pgbench -S -c %d: the fake proxy's CPU per transaction" % c, "µs", "%.1f",
               "value", columns=("keyhole", "stunnel")),
        Metric("cs_tps_c", "pgbench -S -C -c %d: new connections" % cc, "per s", "%.0f", "ratio",
               columns=("direct@pg", "keyhole@pg", "keyhole", "keyhole-lazy", "stunnel")),
        Metric("cs_cpu_c", "pgbench -S -C: proxy CPU per new connection", "µs", "%.0f", "ratio",
               columns=("keyhole@pg", "keyhole", "keyhole-lazy", "stunnel")),
        Metric("cs_first", "first connection through a fresh process (psql -c 'select 1', wall time)", "ms",
               "%.1f", "delta", columns=("direct@pg", "keyhole@pg", "keyhole", "keyhole-lazy")),
    ]


def latency_metrics(run):
    """The latency table's rows: pgbench -S over the relay; ratios are to direct over it."""
    if not run.latency.keys:
        return []
    rows = []
    for c in run.latency.clients:
        rows += pgbench_metrics(c, "latency")
    return rows


def via_metrics(run):
    """The via= table's rows; ratios and deltas are to keyhole direct."""
    if not run.via.keys:
        return []
    c = run.via.clients
    every = ("keyhole", "ssh", "ssh-L", "socks5", "http")
    hops = every[1:]
    return [
        Metric("via_tps_s8", "pgbench -S -c %d" % c, "TPS", "%.0f", "ratio", Target.parse("sshL>=0.95"),
               columns=every),
        Metric("via_lat_s8", "pgbench -S -c %d latency" % c, "ms", "%.3f", "ratio", columns=every),
        Metric("via_cpu_s8", "pgbench -S -c %d: CPU per transaction, keyhole and its ssh" % c, "µs", "%.1f",
               "ratio", Target.parse("sshL<=1.1"), columns=every),
        Metric("via_hop_s8", "pgbench -S -c %d: the hop's CPU per transaction" % c, "µs", "%.1f", "value",
               columns=hops),
        Metric("via_tps_c", "pgbench -S -C -c %d: new connections" % c, "per s", "%.0f", "ratio", columns=every),
        Metric("via_lat_c", "pgbench -S -C latency (+ added per new connection)", "ms", "%.3f", "delta",
               columns=every),
        Metric("via_cpu_c", "pgbench -S -C: CPU per new connection, keyhole and its ssh", "µs", "%.0f", "ratio",
               columns=every),
        Metric("via_hop_c", "pgbench -S -C: the hop's CPU per new connection", "µs", "%.0f", "value",
               columns=hops),
        Metric("via_login", "SSH login of keyhole's master connection (at its start, from its log)", "ms",
               "%.0f", "value", columns=("ssh",)),
    ]


# --- the tables -----------------------------------------------------------------


class Table:
    """A group's table: its rows, its columns, where their samples are, and the
    column (the baseline) their ratios and differences are to."""

    subdir = ""  # of the samples
    baseline = ""
    delta_format = " (%+.3f)"
    # the columns after the results: heading and alignment
    extra = (("keyhole target", "---"), ("met", "---"))

    def __init__(self, run, samples, metrics, columns):
        self.run = run
        self.samples = samples
        self.metrics = metrics
        self.columns = columns

    def file(self, column, metric_id):
        return (self.subdir + "/" if self.subdir else "") + column + "." + metric_id

    def median(self, column, metric_id):
        return self.samples.median(self.file(column, metric_id))

    def value(self, column, metric):
        """The column's figure of the row: its median, or for an added row its
        source's median minus the baseline's, scaled (None without both)."""
        if metric.kind == "pool":
            m, b = self.median(column, metric.source), self.median(POOLER, metric.source)
            return None if m is None or b is None or b <= 0 else m / b
        if metric.kind != "added":
            return self.median(column, metric.id)
        m, b = self.median(column, metric.source), self.median(self.baseline, metric.source)
        return None if m is None or b is None else (m - b) * metric.scale

    def round_values(self, column, metric):
        """The column's samples of the row (an added row: one difference per round,
        when both columns have every round)."""
        if metric.kind not in DERIVED_KINDS:
            return self.samples.values(self.file(column, metric.id))
        m = self.samples.values(self.file(column, metric.source))
        if metric.kind == "pool":
            b = self.samples.values(self.file(POOLER, metric.source))
            return [x / y for x, y in zip(m, b) if y > 0] if len(m) == len(b) else []
        b = self.samples.values(self.file(self.baseline, metric.source))
        return [(x - y) * metric.scale for x, y in zip(m, b)] if len(m) == len(b) else []

    def failures(self, column, metric):
        """Why rounds of the row's workload failed on the column."""
        name = self.file(column, metric.source if metric.kind in DERIVED_KINDS else metric.id)
        return self.samples.failures(name)

    def heading(self, column):
        return column

    def has(self, column, metric):
        """The column has the figure (bench.json lists it)."""
        return column in metric.columns

    def shows(self, column, metric):
        """The table shows the column's figure."""
        return self.has(column, metric)

    def compared(self, column):
        """The column's cells carry their ratio or difference to the baseline."""
        return column != self.baseline

    def target_met(self, metric):
        """yes, no, or - (no data; or the run was too small to tell)."""
        return "-"

    def target_cells(self, metric):
        return [metric.target.text(), self.target_met(metric)]

    def cell(self, column, metric):
        if not self.shows(column, metric):
            return "-"
        fails = "*" if self.failures(column, metric) else ""
        m = self.value(column, metric)
        if m is None:
            return "fail" if fails else "-"
        text = figure(m, metric.format)
        if metric.kind == "added" and not text.startswith("-"):
            text = "+" + text
        if metric.kind == "pool":
            return text + "×" + fails
        if metric.kind == "cpu":
            # (a proxy's CPU next to keyhole's on the same row)
            base = self.median("keyhole", metric.id) if column != "keyhole" else None
            if base is not None and base > 0:
                text += " (%.2f×)" % (m / base)
            return text + fails
        base = self.median(self.baseline, metric.id) if self.compared(column) else None
        if base is not None:
            if metric.kind == "ratio" and base > 0:
                text += " (%.2f×)" % (m / base)
            elif metric.kind == "delta":
                text += self.delta_format % (m - base)
        return text + fails

    def markdown(self):
        out = "| workload | unit |" + "".join(" %s |" % self.heading(c) for c in self.columns)
        out += "".join(" %s |" % heading for heading, _ in self.extra) + "\n|---|---|"
        out += "---:|" * len(self.columns) + "".join(align + "|" for _, align in self.extra) + "\n"
        for metric in self.metrics:
            out += "| %s | %s |" % (metric.label, metric.unit)
            out += "".join(" %s |" % self.cell(c, metric) for c in self.columns)
            if metric.target:
                out += "".join(" %s |" % text for text in self.target_cells(metric)) + "\n"
            else:
                out += " |" * len(self.extra) + "\n"
        return out

    def targets(self):
        """yes, no or - for each row with a target."""
        return [self.target_met(m) for m in self.metrics if m.target]

    def json_head(self, metric):
        """A row of bench.json before its target and results."""
        return {"id": metric.id, "label": metric.label, "unit": metric.unit, "kind": metric.kind}

    def json_results(self, metric, column, m):
        """The ratios of a column's median M in bench.json."""
        return {}

    def json_rows(self):
        """bench.json's rows: what each is, its target, and the results by column."""
        rows = []
        for metric in self.metrics:
            met = {"yes": True, "no": False}.get(self.target_met(metric)) if metric.target else None
            row = self.json_head(metric)
            row["target"] = str(metric.target or "")
            row["target_met"] = met
            results = {}
            for column in self.columns:
                if not self.has(column, metric):
                    continue
                m = self.value(column, metric)
                result = {"samples": [fixed(v, 6) for v in self.round_values(column, metric)], "median": fixed(m, 6)}
                result.update(self.json_results(metric, column, m))
                result["failures"] = self.failures(column, metric)
                results[column] = result
            row["results"] = results
            rows.append(row)
        return rows


class MainTable(Table):
    """Every path to PostgreSQL, the synthetic upstream and MariaDB; ratios to direct."""

    baseline = "direct"
    headings = {POOL_PATH: "keyhole pool=session", PORTABLE_PATH: "keyhole portable"}
    # keyhole pool=session's figures that keyhole's target on the row does not judge:
    # a pooled session goes through a relay with two 16 KiB buffers, not the splice
    unjudged = ("rss_pg",)

    def __init__(self, run, samples):
        super().__init__(run, samples, main_metrics(run), run.paths)

    def heading(self, column):
        return self.headings.get(column, column)

    def has(self, column, metric):
        """The path is measured against the row's server, and has such a figure."""
        if metric.kind == "pool":
            return column == POOL_PATH
        served = metric.server in self.run.servers.get(column, [])
        return served and not (column == "direct" and metric.kind in PROXY_KINDS)

    def shows(self, column, metric):
        # (the table leaves out a path that did not run; bench.json has its empty results)
        return self.has(column, metric) and self.run.ran(column)

    def cell(self, column, metric):
        text = super().cell(column, metric)
        if column == POOL_PATH and metric.id in self.unjudged and text != "-":
            text += " †"
        return text

    def target_met(self, metric):
        target = metric.target
        if target.kind == "pgbouncer":
            return ratio_met(target, self.median(POOL_PATH, metric.source), self.median(POOLER, metric.source))
        if target.kind == "ratio":
            return ratio_met(target, self.median("keyhole", metric.id), self.median("direct", metric.id))
        if target.kind == "max":
            m = self.median("keyhole", metric.id)
            return "-" if m is None else ("yes" if target.holds(m) else "no")
        if target.kind == "held":
            name = self.file("keyhole", metric.id)
            if self.samples.failures(name):
                return "no"
            if not self.samples.values(name) or self.run.idle_large < 10000:
                return "-"
            return "yes"
        return "-"

    def json_head(self, metric):
        head = {"id": metric.id, "server": metric.server, "label": metric.label, "unit": metric.unit,
                "kind": metric.kind}
        if metric.kind == "pool":
            head["of"] = "%s.%s over %s.%s" % (POOL_PATH, metric.source, POOLER, metric.source)
        return head

    def json_results(self, metric, column, m):
        return proxy_ratios(self, metric, column, m)


def proxy_ratios(table, metric, column, m):
    """bench.json's ratios of a main or latency row: to direct; a CPU row's to keyhole."""
    out = {"ratio_to_direct": ratio(m, table.median("direct", metric.id)) if metric.kind == "ratio" else None}
    if metric.kind == "cpu":
        out["ratio_to_keyhole"] = ratio(m, table.median("keyhole", metric.id)) if column != "keyhole" else None
    return out


class LatencyTable(Table):
    """Every path over the latency relay; ratios to direct over the same relay. The
    column loopback is direct without the relay: what the relay adds, for scale."""

    subdir = "latency"
    baseline = "direct"
    extra = ()
    headings = {"loopback": "direct, no relay", "direct": "direct over the relay"}

    def __init__(self, run, samples):
        super().__init__(run, samples, latency_metrics(run), run.latency.keys)

    def heading(self, column):
        return self.headings.get(column, column)

    def has(self, column, metric):
        return not (column in ("loopback", "direct") and metric.kind in PROXY_KINDS)

    def compared(self, column):
        return column not in ("loopback", "direct")

    def relay_added_ms(self):
        """What the relay added to direct's round trip: its -c 1 latency over the relay
        minus without it, in ms (None without both)."""
        m, b = self.median("direct", "lat_tps_s1"), self.median("loopback", "lat_tps_s1")
        return None if m is None or b is None else m - b

    def json_head(self, metric):
        return {"id": metric.id, "server": "latency", "label": metric.label, "unit": metric.unit,
                "kind": metric.kind}

    def json_results(self, metric, column, m):
        return proxy_ratios(self, metric, column, m)


class CloudSqlTable(Table):
    """keyhole's connector through the fake Cloud SQL instance; ratios to keyhole@pg."""

    subdir = "cloudsql"
    baseline = "keyhole@pg"
    delta_format = " (%+.1f)"
    headings = {
        "direct@pg": "direct → PostgreSQL",
        "keyhole@pg": "keyhole → PostgreSQL",
        "keyhole": "keyhole connector",
        "keyhole-lazy": "connector, --lazy-refresh",
        "stunnel": "stunnel → fake proxy",
    }

    def __init__(self, run, samples):
        super().__init__(run, samples, cloudsql_metrics(run), run.cloudsql.keys)

    def heading(self, column):
        return self.headings.get(column, "")

    def compared(self, column):
        # (direct is there for scale: no ratio)
        return column not in ("keyhole@pg", "direct@pg")

    def target_met(self, metric):
        if metric.target.kind == "ratio":
            return ratio_met(metric.target, self.median("keyhole", metric.id), self.median("keyhole@pg", metric.id))
        return "-"

    def column_text(self, column):
        """What the column includes."""
        return {
            "direct@pg": "libpq straight to PostgreSQL over TLS (sslmode=verify-full): no proxy, no fake",
            "keyhole@pg": "keyhole with its ordinary target (postgres://127.0.0.1:PORT, verify-full), TLS to "
            "PostgreSQL's own TLS (OpenSSL) over TCP: the baseline of the ratios",
            "keyhole": "keyhole's connector, refresh-ahead (the instance %s as its target): the fake API for "
            "settings and certificate, then TLS 1.3 with the ephemeral client certificate (RSA-2048) to the fake "
            "server-side proxy, which splices to PostgreSQL's Unix socket" % self.run.cloudsql.instance,
            "keyhole-lazy": "the same with --lazy-refresh (the certificate is fetched by the first connection "
            "that finds none)",
            "stunnel": "stunnel (client mode, a certificate from the fake's client CA for an RSA-2048 key, "
            "verifyChain, checkHost = the instance's CN) in keyhole's place, to the same fake proxy: no "
            "PostgreSQL 15 client speaks TLS from the first byte (libpq's sslnegotiation=direct came in 17), "
            "so the stock reference on that path is a TLS proxy",
        }.get(column, "")

    def api_requests(self):
        """The API requests the fake answered during the measured runs through the
        connector (each run comes after a warm-up connection; 0 is expected)."""
        total = 0
        for name in self.samples.figures("keyhole*.cs_api_*", self.subdir):
            total += sum(int(line.strip().rsplit(".", 1)[0]) for line in self.samples.lines(name))
        return total

    def json_head(self, metric):
        return {"id": metric.id, "server": "cloudsql", "label": metric.label, "unit": metric.unit,
                "kind": metric.kind, "baseline": self.baseline}

    def json_results(self, metric, column, m):
        rd = rb = None
        if m is not None and metric.kind == "ratio":
            rd = ratio(m, self.median("direct@pg", metric.id))
            if column != "direct@pg":
                rb = ratio(m, self.median(self.baseline, metric.id))
        return {"ratio_to_direct": rd, "ratio_to_baseline": rb}


class ViaTable(Table):
    """keyhole through each hop (via=), next to keyhole direct (the baseline) and ssh -L."""

    subdir = "via"
    baseline = "keyhole"
    extra = (("keyhole target", "---"), ("via=ssh / ssh -L", "---:"), ("met", "---"))
    headings = {
        "keyhole": "keyhole direct",
        "ssh": "via=ssh://bastion",
        "ssh-L": "ssh -L + keyhole direct",
        "socks5": "via=socks5:// (microsocks)",
        "http": "via=http:// (tinyproxy)",
    }

    def __init__(self, run, samples):
        super().__init__(run, samples, via_metrics(run), run.via.keys)

    def heading(self, column):
        return self.headings.get(column, "")

    def target_met(self, metric):
        if metric.target.kind == "sshL":
            return ratio_met(metric.target, self.median("ssh", metric.id), self.median("ssh-L", metric.id))
        return "-"

    def ssh_ratio(self, metric):
        """via=ssh's median over ssh -L's, e.g. 1.02× (empty without both)."""
        m, b = self.median("ssh", metric.id), self.median("ssh-L", metric.id)
        return "%.2f×" % (m / b) if m is not None and b is not None and b > 0 else ""

    def target_cells(self, metric):
        return [metric.target.text(), self.ssh_ratio(metric), self.target_met(metric)]

    @staticmethod
    def column_text(column):
        """What the column runs."""
        return {
            "keyhole": "keyhole with its ordinary target, TLS to PostgreSQL over loopback TCP, as in the main "
            "table: the baseline of the ratios",
            "ssh": "keyhole's via=ssh with --ssh-config: one OpenSSH master connection (ssh -M -N, a child of "
            "keyhole) logged in to sshd at keyhole's start; each client connection is a stdio-forward channel on "
            "it that keyhole asks for over the control socket, the master moving the bytes between a Unix socket "
            "pair and the channel; TLS from keyhole inside it",
            "ssh-L": "the tunnel a developer opens by hand, with keyhole direct to its local port: each connection "
            "crosses loopback TCP to ssh, then a channel on its one SSH connection to sshd, which connects to "
            "PostgreSQL: what ssh costs, the reference for via=ssh",
            "socks5": "keyhole's via=socks5:// through microsocks (no login): per client connection a TCP "
            "connection to the proxy, a SOCKS5 greeting and CONNECT, and the proxy's own connection to PostgreSQL",
            "http": "keyhole's via=http:// through tinyproxy: per client connection a TCP connection to the proxy, "
            "an HTTP CONNECT, and the proxy's own connection to PostgreSQL",
        }.get(column, "")

    def json_results(self, metric, column, m):
        rb = rs = None
        if m is not None:
            if column != self.baseline:
                rb = ratio(m, self.median(self.baseline, metric.id))
            if column == "ssh":
                rs = ratio(m, self.median("ssh-L", metric.id))
        return {"ratio_to_baseline": rb, "ratio_to_ssh_L": rs}


# --- markdown -------------------------------------------------------------------


@dataclass
class Report:
    """Everything the report is made of."""

    run: Run
    samples: Samples
    machine: Machine
    now: datetime.datetime
    main: MainTable = field(init=False)
    cloudsql: CloudSqlTable = field(init=False)
    via: ViaTable = field(init=False)
    latency: LatencyTable = field(init=False)

    def __post_init__(self):
        self.main = MainTable(self.run, self.samples)
        self.cloudsql = CloudSqlTable(self.run, self.samples)
        self.via = ViaTable(self.run, self.samples)
        self.latency = LatencyTable(self.run, self.samples)


def targets_line(report):
    met = report.main.targets() + report.cloudsql.targets() + report.via.targets()
    yes, no = met.count("yes"), met.count("no")
    return "keyhole targets: %d met, %d missed, %d not measured in this run\n" % (yes, no, len(met) - yes - no)


MAIN_LEGEND = """
Medians over the rounds. Proxy cells: the value (ratio to direct), or for latency under
`-C` the value (difference to direct in ms: what the proxy adds to each new connection).
TPS: pgbench or sysbench transactions per second; latency: their average. MB/s: bytes
moved per wall second (COPY out and the bulk reads to /dev/null, COPY in from a
generator). Proxy CPU (× keyhole): user + system microseconds of the proxy process per
transaction, per new connection under `-C`, per query for MySQL (oltp_point_select
sends one query per transaction), and in parentheses its ratio to keyhole's on the same
row: above 1, the proxy spends more CPU than keyhole for the same work. Proxy CPU in
s/GB: user + system seconds per GB moved. Latency added per round trip: at `-c 1`
(one client, one query per transaction, so one round trip each) the proxy's average
latency minus direct's, in µs: what the proxy adds to every request and its answer.
RSS: growth of the proxy's VmRSS per idle connection (each logged in, one query run),
on a freshly started proxy. `*`: some rounds failed (see the notes); `-`: not measured.
"""

POOL_LEGEND = """
keyhole pool=session: the same keyhole logging in itself (user=bench, password-file=)
with `pool=session&pool-size=%s`, pgbouncer's default_pool_size, in front of PostgreSQL
only: each client is handed a server connection another client left (after DISCARD
ALL) instead of a new TCP connection, TLS handshake and login, as pgbouncer's session
pool does; its `-C` figure is pooling, to be read next to pgbouncer's (the row "its
rate over pgbouncer's" and its target), not next to direct's. Its sessions go through
a relay that reads each message's header, not the zero-copy splice. `†`: a pooled
session holds two 16 KiB buffers, so its RSS per idle connection (each holding a server
connection, as pgbouncer's) is shown but not judged by keyhole's target, which is the
splice path's.
"""


def portable_ratios(report):
    """keyhole portable's medians over keyhole's, this run: (metric id, what, ratio),
    for the rows both have."""
    run, table = report.run, report.main
    items = [("cpu_tps_s%d" % c, "CPU per transaction at -c %d" % c) for c in run.pgbench_clients]
    items += [("copy_out_mbs", "COPY out MB/s"), ("copy_in_mbs", "COPY in MB/s"),
              ("syn_mbs", "synthetic stream MB/s"), ("syn_cpu", "synthetic stream CPU s/GB")]
    if run.mysql:
        items += [("my_cpu", "MySQL CPU per query"), ("my_bulk_mbs", "MySQL bulk read MB/s")]
    out = []
    for metric_id, what in items:
        m, k = table.median(PORTABLE_PATH, metric_id), table.median("keyhole", metric_id)
        if m is not None and k is not None and k > 0:
            out.append((metric_id, what, m / k))
    return out


def kernel_tls_used(run):
    """keyhole (the Linux build) uses kernel TLS in this run: the kernel has it, and
    keyhole's flags ask for it."""
    return run.kernel_tls.get("available") == "yes" and bool(run.kernel_tls.get("asked"))


def portable_markdown(report):
    """The line under the main table on keyhole portable: what can set it apart from
    keyhole on this machine, and by how much it did."""
    run = report.run
    k = run.kernel_tls
    available, probe = k.get("available", ""), k.get("probe", "")
    detail = probe.split(": ", 1)[1] if ": " in probe else probe
    if available == "no":
        kernel = "kernel TLS is unavailable on this kernel (%s)" % detail
    elif available != "yes":
        kernel = "whether this kernel has kernel TLS is not known (%s)" % (detail or "not probed")
    elif k.get("asked"):
        kernel = "this kernel has kernel TLS and keyhole runs with `--kernel-tls auto`"
    else:
        kernel = ("this kernel has kernel TLS, but keyhole runs without it (`--kernel-tls` is off by default; "
                  "BENCH_KEYHOLE_FLAGS=\"--kernel-tls auto\" turns it on)")
    out = ("\nkeyhole portable (the same keyhole built with `--cfg keyhole_portable`: the data path macOS and "
           "Windows get, no target judges it): %s. Every server here speaks TLS and every client leg is plain "
           "TCP, so splice(2), which only joins two plain legs, moves no byte in either build" % kernel)
    if kernel_tls_used(run):
        out += ("; the two columns differ by kernel TLS alone: keyhole moves the servers' TLS records in the "
                "kernel where it offers the negotiated suite, keyhole portable in rustls' record layer.")
    else:
        out += ("; both builds therefore run the same data path here (through keyhole's memory, TLS records in "
                "rustls' record layer), and the two columns differ by their build and by noise only: whatever "
                "splice(2) and kernel TLS save the Linux build, this machine cannot show it.")
    ratios = portable_ratios(report)
    if ratios:
        out += " keyhole portable over keyhole, this run: " + ", ".join(
            "%s %.2f×" % (what, value) for _, what, value in ratios) + "."
    return out + "\n"


def portable_json(report):
    run = report.run
    out = {"ran": PORTABLE_PATH in run.paths and run.ran(PORTABLE_PATH), "kernel_tls": run.kernel_tls,
           "kernel_tls_used": kernel_tls_used(run)}
    out["over_keyhole"] = {metric_id: fixed(value, 4) for metric_id, _, value in portable_ratios(report)}
    return out


def mysql_markdown(report):
    """Which paths the MySQL rows have, and why no other: the MySQL-speaking proxies
    looked for and what was found."""
    run = report.run
    out = "\n## MySQL paths\n\n"
    keyholes = "keyhole and keyhole portable" if PORTABLE_PATH in run.paths and run.ran(PORTABLE_PATH) else "keyhole"
    out += (
        "The MySQL rows have direct and " + keyholes + " only. pgbouncer and goproxy speak PostgreSQL only; "
        "stunnel (like haproxy) puts TLS around the connection from its first byte (its `protocol =` "
        "options know pgsql but not MySQL), while MySQL's TLS starts inside the protocol (the server's "
        "greeting in the clear, then the client's SSL request), so neither can stand in. "
        "MySQL-speaking proxies that can verify the server's certificate were looked for in this "
        "machine's package lists")
    if run.mysql_proxies_how.startswith("not looked up"):
        return out + ": %s.\n" % run.mysql_proxies_how
    if not run.mysql_proxies:
        # (a context from before they were looked up)
        return out + "; what was found is not recorded for this run.\n"
    if run.mysql_proxies_how:
        out += " (%s)" % run.mysql_proxies_how
    found = {pkg: version for pkg, version in run.mysql_proxies.items() if version}
    out += ": " + ", ".join(
        "%s (%s)" % (pkg, "candidate %s" % version if version else "not packaged")
        for pkg, version in sorted(run.mysql_proxies.items())) + "."
    if found:
        out += (" %s could be installed, but this harness does not run %s yet: no MySQL path but keyhole's."
                % (", ".join(sorted(found)), "it" if len(found) == 1 else "them"))
    else:
        out += " None is installable here, so no MySQL path but keyhole's."
    return out + "\n"


def latency_markdown(report):
    run, table = report.run, report.latency
    lat = run.latency
    rtt = lat.round_trip_ms()
    out = "\n## pgbench over a ~%s ms link\n\n" % rtt
    out += (
        "Every path with `latency_relay` (benches/latency_relay.rs, on 127.0.0.1:%d) between it and PostgreSQL: "
        "the relay delivers each chunk of bytes %s ms after it read it, each way, in order and without a "
        "bandwidth limit, so every round trip to the server takes about %s ms more (this kernel has no netem). "
        "direct: pgbench → relay → PostgreSQL (TLS verify-full through the relay); a proxy: pgbench → proxy "
        "(plain TCP on loopback) → relay → PostgreSQL, the proxy next to its client as a sidecar or a "
        "developer's local proxy is, the slow link between it and the server. pgbench -S -c %s, -T %d, every "
        "path in every round, in an order that rotates. The relay's scheduling: %s.\n\n" % (
            lat.relay_port, lat.delay_ms, rtt, " and -c ".join(map(str, lat.clients)), run.duration,
            lat.priority or "?"))
    out += table.markdown()
    added = table.relay_added_ms()
    if added is not None:
        out += ("\nThe relay added %.3f ms to each of direct's round trips this run (its `-c 1` latency over the relay "
                "minus without it; %s ms asked for, the rest is the relay's own wake-ups and copies and the machine's "
                "load).\n" % (added, rtt))
    out += """
Medians over the rounds. Cells: the value and, in parentheses, its ratio to direct over
the same relay (direct without the relay is there for scale); proxy CPU (× keyhole):
the proxy's user + system microseconds per transaction and its ratio to keyhole's;
latency added per round trip: at `-c 1` the proxy's average latency minus direct's
over the relay, in µs. Over a real link a proxy's own cost is a small part of each
round trip: the ratios say how much of it is left; what a proxy adds per round trip
should be about what it adds on loopback (the main table's row of the same name), not
more.
"""
    return out


def header_markdown(report):
    run, machine = report.run, report.machine
    cs, via = run.cloudsql, run.via
    out = "# keyhole benchmark\n\n"
    out += "- date: %s%s\n" % (report.now.strftime("%Y-%m-%d %H:%M UTC"),
                                " (quick mode: not for comparison)" if run.quick else "")
    out += "- machine: %d cores (%s), %s GiB memory, Linux %s\n" % (
        machine.nproc, machine.cpu, machine.memory_gib, machine.kernel)
    out += "- load average (1, 5, 15 min): %s before the rounds, %s after; the rounds took %s\n" % (
        run.load_before, run.load_after, duration_text(run.rounds_seconds))
    if run.main:
        out += (
            "- settings: %d round(s), median kept, paths alternating; pgbench -S -c %s and -S -C -c %d, -T %d, "
            "scale %d; COPY out and in %d bytes; synthetic stream %d bytes; idle connections %d (PostgreSQL) "
            "and %d (synthetic)" % (run.rounds, " ".join(map(str, run.pgbench_clients)), run.conn_clients,
                                    run.duration, run.scale, run.copy_bytes, run.stream_bytes, run.idle_conns,
                                    run.idle_large))
    else:
        out += "- settings: --only %s: %d round(s), median kept, columns alternating; pgbench scale %d" % (
            run.only, run.rounds, run.scale)
    if run.mysql:
        out += "; sysbench oltp_point_select %s threads, -T %d, %d rows; MySQL bulk read %d bytes" % (
            " and ".join(map(str, run.mysql_threads)), run.duration, run.mysql_table_size, run.mysql_bytes)
    if cs.keys:
        out += "; Cloud SQL: pgbench -S -c %d and -S -C -c %d, %d first connections per column and round" % (
            cs.clients, run.conn_clients, run.first_runs)
    if via.keys:
        out += "; via=: pgbench -S -c %d and -S -C -c %d, -T %d" % (via.clients, via.clients, via.duration)
    if run.latency.keys:
        out += "; over the latency relay (%s ms each way): pgbench -S -c %s, -T %d" % (
            run.latency.delay_ms, " and -c ".join(map(str, run.latency.clients)), run.duration)
    out += "\n- servers: %s, TLS only (hostssl, md5)" % run.version("postgres")
    if run.main:
        out += "; the synthetic upstream (benches/synthetic.rs)"
    if run.mysql:
        out += "; %s, require_secure_transport=ON" % run.version("mariadb")
    if cs.keys:
        out += "; a fake Cloud SQL instance in front of that PostgreSQL (benches/cloudsql_fake.rs)"
    if via.keys:
        out += "; sshd, microsocks and tinyproxy in front of it (via=)"
    if run.latency.keys:
        out += "; a latency relay in front of it (benches/latency_relay.rs)"
    out += "; all on this machine\n"
    out += "- clients: %s" % run.version("pgbench")
    if run.mysql:
        out += ", %s, %s" % (run.version("sysbench"), run.version("mariadb_client"))
    out += "\n"
    for p in run.paths:
        if p != "direct" and run.ran(p):
            out += "- %s: %s\n" % (p, run.version(p))
    return out + "\n"


def cloudsql_markdown(report):
    cs, table = report.run.cloudsql, report.cloudsql
    out = "\n## Cloud SQL connector\n\n"
    out += (
        "keyhole with a Cloud SQL instance as its target, against `cloudsql_fake` (benches/cloudsql_fake.rs): "
        "a fake SQL Admin API (%s) and a fake server-side proxy on %s (TLS 1.3 from the first byte, ECDSA P-256 "
        "server certificate with CN %s, the client certificate required, no session resumption), which splices "
        "each connection to the same PostgreSQL through its Unix socket (pg_hba: md5 for bench there, as over "
        "TCP).\n\n" % (cs.api, cs.proxy, cs.cn))
    out += table.markdown()
    out += """
Medians over the rounds. Cells: the value and, in parentheses, its ratio to keyhole →
PostgreSQL (keyhole with an ordinary target), or for the first connection the
milliseconds it adds to keyhole → PostgreSQL's; direct is there for scale. Proxy CPU:
user + system time of the proxy process (keyhole or stunnel) per transaction, or per
connection under `-C`; the fake's likewise.
"""
    out += "\nWhat each column includes:\n\n"
    for key in cs.keys:
        out += "- %s: %s.\n" % (table.heading(key), table.column_text(key))
    out += """
How to read it:

- Steady state: the connector's path has one hop more than keyhole → PostgreSQL (the
  fake proxy, on the same cores), and on it PostgreSQL does no TLS (the fake does), so
  its TPS is not keyhole's cost alone. keyhole's own cost is its CPU per transaction,
  which must be the same as for any other target (the target above); stunnel is
  another proxy on the identical path; the fake's CPU is shown apart.
- New connections: every path makes a full TLS 1.3 handshake (PostgreSQL turns session
  tickets off; the fake issues none). Through the fake the client also presents a
  certificate and signs with its RSA-2048 key, which keyhole → PostgreSQL does not.
  Each measured run through the fake comes after one connection, so that a
  --lazy-refresh keyhole has its certificate: both modes use a cached one (the fake
  answered %d API requests during those runs).
- First connection: a freshly started process each time (none for direct), listening,
  then after 0.5 s (refresh-ahead: also once its log says its first certificate is in)
  one psql -c 'select 1': psql's whole wall time, its start and login included,
  %d runs per round. --lazy-refresh pays for the RSA-2048 key generation and
  both API calls on that connection; refresh-ahead has done them by then (a client that
  connects before its first refresh ends waits for it).
""" % (table.api_requests(), report.run.first_runs)
    return out


def via_markdown(report):
    run, table = report.run, report.via
    via = run.via
    out = "\n## Hops (via=)\n\n"
    out += (
        "keyhole through each hop to the same PostgreSQL (127.0.0.1:%s, TLS from keyhole, verify-full against "
        "localhost), next to keyhole direct and the ssh -L tunnel a developer opens by hand, all on this "
        "machine's loopback: %s (sshd and ssh), microsocks %s, %s. pgbench -S -c %d and -S -C -c %d, -T %d, "
        "every column in every round, in an order that rotates.\n\n" % (
            via.pg_port, run.version("ssh"), run.version("microsocks"), run.version("tinyproxy"),
            via.clients, via.clients, via.duration))
    out += table.markdown()
    out += """
Medians over the rounds. Cells: the value and, in parentheses, its ratio to keyhole
direct, or for the latency under `-C` the milliseconds it adds to keyhole direct's.
"via=ssh / ssh -L": the ratio the targets are about. CPU "keyhole and its ssh": user +
system time of keyhole's process tree (with via=ssh, its ssh master is a child of
keyhole) and, for ssh -L, of the ssh -L process too: what runs on the developer's
machine; per transaction, or per connection under `-C`. The hop's CPU: sshd's process
tree (its listener and the processes of the SSH connection in use), microsocks,
tinyproxy: what runs on the bastion.
"""
    out += "\nWhat each column runs (TMP: the run's temporary directory; this run's ports):\n\n"
    for key in via.keys:
        command = via.commands.get(key, "").replace(" + ", "` + `")
        out += "- %s: %s. `%s`\n" % (table.heading(key), table.column_text(key), command)
    out += (
        "- the bastion, for via=ssh and ssh -L: `%s` (public-key login only, a fresh ed25519 host key and client "
        "key); the ssh client config both use: Host bastion, HostName 127.0.0.1, Port, User, IdentityFile, "
        "IdentitiesOnly yes, UserKnownHostsFile with the host key, StrictHostKeyChecking yes, BatchMode yes.\n"
        % via.bastion_command)
    out += """
How to read it:

- Steady state: via=ssh and ssh -L do the same work (keyhole's TLS, one SSH channel
  per connection on one SSH connection, sshd's connection to PostgreSQL); keyhole hands
  its bytes to the ssh master over a Unix socket pair instead of a loopback TCP
  connection. The targets: via=ssh costs what ssh -L costs, not more (TPS ≥ 0.95×, CPU
  of keyhole and its ssh ≤ 1.1×). SOCKS5 and CONNECT proxies relay bytes without
  encryption of their own, so they cost less than ssh.
- New connections: via=ssh opens a channel on the logged-in master (a request over its
  control socket and a socket pair passed to it: no login, no process); ssh -L opens a
  channel per accepted connection; SOCKS5 and CONNECT each add a TCP connection to the
  proxy, a round trip, and the proxy's own connection. The latency row says what each
  adds to every new connection; where it is far above the CPU each adds, the rest is
  waiting on the hop's path, not work.
- The SSH login happens once per keyhole process (at its start): shown apart, not in
  the `-C` figures.
"""
    return out


def failure_note(samples, name, prefix, rounds=None):
    """A note on a workload's failed rounds: "PREFIX: 1/2 failed: why" (ROUNDS: the 2)."""
    reasons = samples.lines(name)
    count = "%d" % len(reasons) if rounds is None else "%d/%d" % (len(reasons), rounds)
    return "%s: %s failed: %s" % (prefix, count, reasons[0] if reasons else "")


def notes(report):
    run, samples = report.run, report.samples
    out = []
    for p in run.paths:
        for note in (run.skip_notes.get(p), run.late_notes.get(p)):
            if note:
                out.append("%s: %s" % (p, note))
        for name in samples.names(p + ".*.fail"):
            out.append(failure_note(samples, name, "%s %s" % (p, name[len(p) + 1:-len(".fail")]), run.rounds))
    if run.mysql_note:
        out.append(run.mysql_note)
    if run.cloudsql.note:
        out.append(run.cloudsql.note)
    out += ["Cloud SQL: " + note for note in run.cloudsql.notes]
    for name in samples.names("*.fail", "cloudsql"):
        key, metric = name[len("cloudsql/"):-len(".fail")].split(".", 1)
        out.append(failure_note(samples, name, "Cloud SQL %s %s" % (key, metric)))
    if run.via.note:
        out.append(run.via.note)
    if run.latency.note:
        out.append(run.latency.note)
    out += ["latency relay: " + note for note in run.latency.notes]
    for name in samples.names("*.fail", "latency"):
        key, metric = name[len("latency/"):-len(".fail")].split(".", 1)
        out.append(failure_note(samples, name, "over the latency relay: %s %s" % (key, metric), run.rounds))
    for name in samples.names("*.fail", "via"):
        key, metric = name[len("via/"):-len(".fail")].split(".", 1)
        out.append(failure_note(samples, name, "via= %s %s" % (key, metric), run.rounds))
    if run.fd_note:
        out.append(run.fd_note)
    if "pgbouncer" in run.paths:
        out.append("pgbouncer reuses its server connections (session pooling), so its -C figure measures pooling, "
                   "not proxying")
    if POOL_PATH in run.paths:
        out.append("keyhole pool=session reuses its server connections too (pool-size %s, pgbouncer's "
                   "default_pool_size): its -C figure measures pooling, and its target is pgbouncer's rate in the "
                   "same run" % (run.pool_size or "?"))
    if run.mysql:
        out.append("sysbench 1.0 asks for TLS on the direct path but its client library does not verify the "
                   "certificate; the other direct clients verify it")
    if run.main and run.idle_large < 10000:
        out.append("fewer than 10,000 idle connections this run: the 'held' target is not judged")
    return "\n## Notes\n\n" + "".join("- %s\n" % note for note in out)


def samples_markdown(report):
    run, samples = report.run, report.samples
    out = ("\n## Samples\n\nOne value per round; cpu_tps_*: the proxy's CPU microseconds per pgbench transaction "
           "(per connection under -C); my_cpu*: per sysbench query; *_t1: sysbench with 1 thread.")
    if run.cloudsql.keys:
        out += (
            " Cloud SQL (path `cloudsql KEY`): cs_tps_*, cs_cpu_* (the proxy's CPU µs per transaction or "
            "connection), cs_fake_* (the fake's), cs_api_* (API requests during the run), cs_first (ms), per "
            "round; cs_first has %d values per round." % run.first_runs)
    if run.via.keys:
        out += (
            " via= (path `via KEY`): via_tps_*, via_lat_* (ms), via_cpu_* (keyhole and its ssh, CPU µs per "
            "transaction or connection), via_hop_* (the hop's), per round; via_login (ms), once.")
    if run.latency.keys:
        out += (" Over the latency relay (path `latency PATH`): the same names as in the main table; `latency "
                "loopback` is direct without the relay.")
    out += "\n\n| path | metric | values |\n|---|---|---|\n"
    groups = [("", "", run.paths), ("cloudsql", "cloudsql ", run.cloudsql.keys), ("via", "via ", run.via.keys),
              ("latency", "latency ", run.latency.keys)]
    for subdir, label, keys in groups:
        for key in keys:
            for name in samples.figures(key + ".*", subdir):
                metric = os.path.basename(name)[len(key) + 1:]
                values = ", ".join("%.3f" % v for v in samples.values(name))
                out += "| %s%s | %s | %s |\n" % (label, key, metric, values)
    return out


def report_markdown(report):
    run = report.run
    out = header_markdown(report)
    if run.main:
        out += report.main.markdown()
        out += "\n" + targets_line(report)
        if PORTABLE_PATH in run.paths and run.ran(PORTABLE_PATH):
            out += portable_markdown(report)
        out += MAIN_LEGEND
        if POOL_PATH in run.paths:
            out += POOL_LEGEND % (run.pool_size or "?")
        if run.mysql:
            out += mysql_markdown(report)
    else:
        out += "The main table was left out (--only %s).\n\n%s" % (run.only, targets_line(report))
    if run.cloudsql.keys:
        out += cloudsql_markdown(report)
    if run.via.keys:
        out += via_markdown(report)
    if run.latency.keys:
        out += latency_markdown(report)
    return out + notes(report) + samples_markdown(report)


# --- JSON -----------------------------------------------------------------------


class Fixed(str):
    """A number in bench.json as written, in a fixed format (6 decimals for samples and
    medians, 4 for ratios)."""


class Lines(list):
    """An array in bench.json with one element a line (the rows of metrics)."""


def fixed(value, decimals):
    return None if value is None else Fixed("%.*f" % (decimals, value))


def ratio(value, base):
    """VALUE / BASE with 4 decimals; None without both, or when BASE is not positive."""
    if value is None or base is None or base <= 0:
        return None
    return fixed(value / base, 4)


def json_text(value):
    """VALUE as JSON, on one line (but Lines)."""
    if isinstance(value, Fixed):
        return str(value)
    if isinstance(value, Lines):
        return "[" + ",".join("\n    " + json_text(v) for v in value) + "\n  ]"
    if value is None or isinstance(value, (bool, int)):
        return json.dumps(value)
    if isinstance(value, str):
        # (a failure's reason is a tool's output, in whatever bytes it had)
        text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (json_text(k), json_text(v)) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json_text(v) for v in value) + "]"
    raise TypeError("no JSON for %r" % (value,))


def cloudsql_json(report):
    cs, table = report.run.cloudsql, report.cloudsql
    out = {"ran": bool(cs.keys), "note": cs.note}
    if cs.keys:
        out.update({"instance": cs.instance, "api": cs.api, "proxy": cs.proxy, "baseline": table.baseline,
                    "api_requests_during_runs": table.api_requests(),
                    "columns": {key: table.column_text(key) for key in cs.keys}})
    out["notes"] = cs.notes
    return out


def via_json(report):
    run, table = report.run, report.via
    via = run.via
    out = {"ran": bool(via.keys), "note": via.note}
    if via.keys:
        out.update({
            "baseline": table.baseline, "clients": via.clients, "duration_s": via.duration,
            "versions": {"openssh": run.version("ssh"), "microsocks": run.version("microsocks"),
                         "tinyproxy": run.version("tinyproxy")},
            "bastion_command": via.bastion_command,
            "columns": {key: {"header": table.heading(key), "what": table.column_text(key),
                              "command": via.commands.get(key, "")} for key in via.keys},
            "metrics": Lines(table.json_rows()),
        })
    return out


def latency_json(report):
    lat = report.run.latency
    out = {"ran": bool(lat.keys), "note": lat.note}
    if lat.keys:
        added = report.latency.relay_added_ms()
        out.update({"baseline": report.latency.baseline, "columns": lat.keys, "clients": lat.clients,
                    "loopback": "the column loopback is direct without the relay",
                    "relay_added_ms_measured": fixed(added, 3),
                    "delay_ms_each_way": Fixed(lat.delay_ms), "round_trip_added_ms": Fixed(lat.round_trip_ms()),
                    "relay": "benches/latency_relay.rs", "relay_priority": lat.priority})
    out["notes"] = lat.notes
    return out


def other_samples_json(report):
    """The samples that are in no row: the idle connections' opening times, the Cloud
    SQL API requests and the fake's CPU under -C."""
    run, samples = report.run, report.samples
    out = {}
    for p in run.paths:
        for name in samples.figures(p + ".open_*"):
            out[name] = [fixed(v, 6) for v in samples.values(name)]
    for key in run.cloudsql.keys:
        names = samples.figures(key + ".cs_api_*", "cloudsql") + samples.figures(key + ".cs_fake_c", "cloudsql")
        for name in names:
            out[name.replace("/", ".", 1)] = [fixed(v, 6) for v in samples.values(name)]
    return out


def report_json(report):
    run, machine = report.run, report.machine
    versions = {"postgres": run.version("postgres"), "pgbench": run.version("pgbench")}
    if run.mysql:
        versions.update({"mariadb": run.version("mariadb"), "sysbench": run.version("sysbench")})
    for p in run.paths:
        if p != "direct" and run.ran(p):
            versions[p] = run.version(p)
    settings = {
        "rounds": run.rounds, "duration_s": run.duration,
        "pgbench_clients": Fixed("[%s]" % ",".join(map(str, run.pgbench_clients))),
        "conn_clients": run.conn_clients, "scale": run.scale, "copy_bytes": run.copy_bytes,
        "stream_bytes": run.stream_bytes, "idle_conns": run.idle_conns, "idle_large": run.idle_large,
        "mysql_threads": Fixed("[%s]" % ",".join(map(str, run.mysql_threads))),
        "mysql_table_size": run.mysql_table_size,
        "mysql_bulk_bytes": run.mysql_bytes, "cloudsql_clients": run.cloudsql.clients,
        "first_runs": run.first_runs, "via_duration_s": run.via.duration, "only": run.only,
        "rounds_seconds": run.rounds_seconds, "fd_note": run.fd_note,
        "latency_clients": Fixed("[%s]" % ",".join(map(str, run.latency.clients))),
        "latency_delay_ms": run.latency.delay_ms,
    }
    document = {
        "date": report.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": run.quick,
        "machine": {"nproc": machine.nproc, "cpu": machine.cpu, "memory_gib": Fixed(machine.memory_gib),
                    "kernel": machine.kernel, "load_before": run.load_before, "load_after": run.load_after},
        "versions": versions,
        "settings": settings,
        "paths": {p: {"ran": run.ran(p), "note": run.skip_notes.get(p) or run.late_notes.get(p) or ""}
                  for p in run.paths},
        "cloudsql": cloudsql_json(report),
        "via": via_json(report),
        "latency": latency_json(report),
        "keyhole_portable": portable_json(report),
        "mysql_proxies": {"looked_up": run.mysql_proxies_how, "candidates": run.mysql_proxies},
        # (the main rows, then the Cloud SQL ones, then those over the latency relay)
        "metrics": Lines(report.main.json_rows() + report.cloudsql.json_rows() + report.latency.json_rows()),
        "other_samples": other_samples_json(report),
    }
    return "{\n" + ",\n".join("  %s: %s" % (json_text(k), json_text(v)) for k, v in document.items()) + "\n}\n"


# --- chart ----------------------------------------------------------------------

GNUPLOT_PANEL = """\
plot "{data}" using 0:(NaN):xtic(1) notitle, \\
  for [k=1:n] "{data}" using ($0 + (k - (n + 1) / 2.0) * w):{value}:(w) with boxes lc rgb word(colors, k) \
title word(names, k), \\
{labels}\
  "{data}" using ($0 - 0.45):(column(n+2)):(0.9):(0) with vectors nohead lw 3 lc rgb "red" notitle
"""


def chart_rows(report, items):
    """The data of a panel, one line per metric: its label, then the median of each
    proxy that ran (the ratio to direct for ratio rows, else the value), then keyhole's
    target ("NaN" where there is none)."""
    table = report.main
    metrics = {m.id: m for m in table.metrics}
    lines = []
    for metric_id, label in items:
        metric = metrics.get(metric_id)
        if metric is None:
            continue
        fields = ['"%s"' % label]
        for p in chart_paths(report):
            m = table.median(p, metric_id)
            if m is None:
                fields.append("NaN")
            elif metric.kind == "ratio":
                d = table.median("direct", metric_id)
                fields.append("NaN" if d is None or d <= 0 else "%.4f" % (m / d))
            else:
                fields.append("%.6f" % m)
        target = metric.target
        fields.append(target.limit if target and target.kind in ("ratio", "max") else "NaN")
        lines.append(" ".join(fields) + "\n")
    return lines


# Each proxy's colour in the chart (the same in every run); others by their place.
CHART_COLORS = {"keyhole": "#1f77b4", PORTABLE_PATH: "#aec7e8", POOL_PATH: "#17becf", "pgbouncer": "#ff7f0e",
                "stunnel": "#2ca02c", "goproxy": "#d62728"}
SPARE_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def chart_color(path, index):
    return CHART_COLORS.get(path, SPARE_COLORS[index % len(SPARE_COLORS)])


def chart_paths(report):
    """The proxies in the chart: those that ran."""
    return [p for p in report.run.paths if p != "direct" and report.run.ran(p)]


def gnuplot_script(report, png, data):
    """The script of the chart; DATA: the panels' data files (ratio, cpu, rss) and
    their line counts."""
    run = report.run
    title = "keyhole benchmark, %s, %d cores, medians of %d round(s)" % (
        report.now.strftime("%Y-%m-%d"), report.machine.nproc, run.rounds)
    if run.quick:
        title += " (quick mode)"

    def panel(name, capped=False):
        path, count = data[name]
        value = "(column(k+1) > cap ? cap : column(k+1))" if capped else "(column(k+1))"
        labels = ""
        if capped:
            labels = ('  for [k=1:n] "%s" using ($0 + (k - (n + 1) / 2.0) * w):(cap):(column(k+1) > cap ? '
                      'sprintf("%%.1f", column(k+1)) : "") with labels offset 0,0.6 font ",8" notitle, \\\n' % path)
        return "set xrange [-0.6:%d.6]\n" % (count - 1), GNUPLOT_PANEL.format(data=path, value=value,
                                                                              labels=labels)

    ratio_range, ratio_plot = panel("ratio", capped=True)
    cpu_range, cpu_plot = panel("cpu")
    rss_range, rss_plot = panel("rss")
    return (
        'set terminal pngcairo size 1800,620 font "sans,10"\n'
        'set output "%s"\n' % png
        + 'set datafile missing "NaN"\n'
        'set style fill solid 0.85 border -1\n'
        "set key top right opaque\nset grid ytics\nset xtics nomirror\nset ytics nomirror\n"
        'set multiplot title "%s"\n' % title
        + "n = %d\nw = 0.8 / n\n" % len(chart_paths(report))
        + 'colors = "%s"\n' % " ".join(chart_color(p, i) for i, p in enumerate(chart_paths(report)))
        + 'names = "%s"\n' % " ".join(chart_paths(report))
        + "cap = 2.5\n"
        # Panel 1: ratios to direct (higher is better), capped; the cap shows the value.
        "set origin 0,0\nset size 0.52,0.95\n"
        'set title "ratio to direct (higher is better; red: keyhole target)"\n'
        "set yrange [0:cap * 1.08]\n" + ratio_range
        + 'set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lc rgb "black"\n'
        + ratio_plot
        + "unset arrow 1\n"
        # Panel 2: CPU s/GB (lower is better).
        "set origin 0.52,0\nset size 0.26,0.95\n"
        'set title "proxy CPU s/GB (lower is better)"\nset yrange [0:*]\nunset key\n'
        + cpu_range + cpu_plot
        # Panel 3: RSS per idle connection.
        + "set origin 0.78,0\nset size 0.22,0.95\n"
        'set title "RSS KiB per idle connection (lower is better)"\nset yrange [0:*]\n'
        + rss_range + rss_plot
        + "unset multiplot\n"
    )


def write_chart(report, png):
    """bench.png, drawn by gnuplot: the ratios to direct, the proxies' CPU per GB and
    their RSS per idle connection, with keyhole's targets."""
    if not shutil.which("gnuplot"):
        warn("gnuplot not found: no chart (Debian package gnuplot-nox)")
        return
    if not chart_paths(report):
        return
    run = report.run
    ratio_items = [("tps_s%d" % c, "-S -c%d" % c) for c in run.pgbench_clients]
    ratio_items += [("tps_c", "-C"), ("copy_out_mbs", "COPY out"), ("copy_in_mbs", "COPY in"),
                    ("syn_mbs", "synthetic")]
    cpu_items = [("copy_out_cpu", "COPY out"), ("copy_in_cpu", "COPY in"), ("syn_cpu", "synth")]
    if run.mysql:
        ratio_items += [("my_tps", "MySQL select"), ("my_bulk_mbs", "MySQL bulk")]
        cpu_items += [("my_bulk_cpu", "MySQL")]
    rss_items = [("rss_pg", "%d, PostgreSQL" % run.idle_conns), ("rss_syn", "%d, synthetic" % run.idle_large)]
    with tempfile.TemporaryDirectory(prefix="keyhole-bench-chart.") as work:
        data = {}
        for name, items in (("ratio", ratio_items), ("cpu", cpu_items), ("rss", rss_items)):
            lines = chart_rows(report, items)
            path = os.path.join(work, name + ".dat")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(lines)
            data[name] = (path, len(lines))
        script = os.path.join(work, "chart.gp")
        with open(script, "w", encoding="utf-8") as f:
            f.write(gnuplot_script(report, png, data))
        sys.stdout.flush()
        done = subprocess.run(["gnuplot", script], stderr=subprocess.PIPE, check=False)
    errors = done.stderr.decode("utf-8", "replace").splitlines()
    if done.returncode != 0:
        warn("gnuplot failed; no chart:")
        for line in errors[:10]:
            print("  " + line, file=sys.stderr)
        return
    for line in errors[:5]:
        print("  gnuplot: " + line, file=sys.stderr)
    log("chart written to %s (%d bytes)" % (png, os.path.getsize(png)))


# --- main -----------------------------------------------------------------------


def log(text):
    print(text, flush=True)


def warn(text):
    sys.stdout.flush()
    print("warning: " + text, file=sys.stderr, flush=True)


def write_text(path, text):
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


def write_out(report, out_dir):
    """The files in OUT_DIR, and the tables on stdout."""
    run = report.run
    md, js, png = (os.path.join(out_dir, name) for name in ("bench.md", "bench.json", "bench.png"))
    write_text(md, report_markdown(report))
    write_text(js, report_json(report))
    # (the chart is of the main table)
    if run.main:
        write_chart(report, png)
        log("")
        sys.stdout.write(report.main.markdown())
        if PORTABLE_PATH in run.paths and run.ran(PORTABLE_PATH):
            sys.stdout.write(portable_markdown(report))
    if run.cloudsql.keys:
        log("")
        log("Cloud SQL connector (ratios to keyhole -> PostgreSQL):")
        sys.stdout.write(report.cloudsql.markdown())
    if run.via.keys:
        log("")
        log("Hops, via= (ratios to keyhole direct):")
        sys.stdout.write(report.via.markdown())
    if run.latency.keys:
        log("")
        log("Over a ~%s ms link, the latency relay (ratios to direct over it):" % run.latency.round_trip_ms())
        sys.stdout.write(report.latency.markdown())
    log("")
    sys.stdout.write(targets_line(report))
    log("")
    written = "%s, %s" % (md, js)
    if os.path.isfile(png) and os.path.getsize(png) > 0:
        written += ", " + png
    log("written: " + written)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="the samples: $tmp/results of scripts/bench.sh")
    parser.add_argument("--context", required=True, help="the run's context (JSON), written by scripts/bench.sh")
    parser.add_argument("--out", help="write bench.md, bench.json and bench.png here (else: markdown to stdout)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
    report = Report(Run.load(args.context), Samples(args.results), Machine.probe(), report_time())
    if args.out:
        write_out(report, args.out)
    else:
        sys.stdout.write(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
