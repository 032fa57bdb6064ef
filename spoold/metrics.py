"""`/metrics` in the Prometheus text format: what the spool says now, read at each scrape (nothing kept)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from spoold import api, ledger, notify, spool
from spoold.spool import Spool


def render(sp: Spool) -> tuple[bytes, str]:
    """(body, content type) for one scrape, from directory listings and the ledger alone."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry()
    now = time.time()
    st = api.status(sp)
    tasks = Gauge("spoold_tasks", "Tasks in each state (inbox: files not taken in yet)", ["state"], registry=registry)
    for state, n in st.counts.items():
        tasks.labels(state).set(n)
    Gauge("spoold_queue_depth", "Tasks waiting in queued/", registry=registry).set(st.counts["queued"])
    Gauge("spoold_oldest_queued_age_seconds", "How long the oldest queued task has waited",
          registry=registry).set(now - spool.id_time(st.oldest_queued).timestamp() if st.oldest_queued else 0)
    usage = ledger.read_usage(sp, now)
    settings = api.load_settings(sp)
    Gauge("spoold_held", "1 while starts wait for a hold (usage limit, login, budget, reserve)",
          registry=registry).set(1 if st.held_until else 0)
    Gauge("spoold_starts_in_window", "Task starts counted in the rolling rate-limit window",
          registry=registry).set(len(ledger.in_window(usage.starts, settings, now)))
    Gauge("spoold_max_requests", "Starts allowed per window (setting max_requests)", registry=registry).set(
        settings.max_requests)
    day = datetime.fromtimestamp(now, UTC)
    Gauge("spoold_cost_usd_today", "Cost of the tasks finished today (UTC), as the results report it",
          registry=registry).set(usage.spend.get(day.strftime("%Y-%m-%d"), 0.0))
    Gauge("spoold_cost_usd_month", "Cost of the tasks finished this month (UTC)", registry=registry).set(
        sum(v for d, v in usage.spend.items() if d.startswith(day.strftime("%Y-%m"))))
    window = Gauge("spoold_subscription_window_used", "Share of a subscription window used, as the CLI last said",
                   ["window", "status"], registry=registry)
    for w in st.windows:
        window.labels(w.name, w.status).set(w.utilization if w.utilization is not None else -1)
    Gauge("spoold_daemons_serving", "Daemons that say they serve the spool (alive on this host, or on another)",
          registry=registry).set(len(api.serving(sp)))
    Gauge("spoold_notify_targets_failing", "Notification targets a daemon cannot reach now",
          registry=registry).set(len(notify.failing(sp)))
    from spoold import history

    day_ago = datetime.fromtimestamp(now - 86_400, UTC)
    recent = history.stats(sp, since=day_ago)
    ended = Gauge("spoold_finished_24h", "Tasks submitted in the last 24 h that have ended, by state", ["state"],
                  registry=registry)
    for by_state in recent.by_day.values():
        for state, n in by_state.items():
            ended.labels(state).inc(n)
    failures = Gauge("spoold_failures_24h", "Failures of the last 24 h, by the reason's first words", ["reason"],
                     registry=registry)
    for reason, n in recent.failures.items():
        failures.labels(reason).set(n)
    return generate_latest(registry), CONTENT_TYPE_LATEST
