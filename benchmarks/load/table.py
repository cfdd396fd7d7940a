"""The load benchmark's figures of one run as a plain-text table."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.load.workload import MB, MIB


def table(r: dict[str, Any]) -> str:
    """The figures of one run as a plain-text table."""
    rss, cpu, lat, ph = r["rss_mib"], r["cpu_upload_phase_s"], r["upload_latency_s"], r["server_phases"]
    agg = r["aggregator"]
    model_mib = r["floats"] * 4 / MIB

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    rows = [
        (
            "edges (one TLS channel each) / client processes",
            f"{r['edges']} / {r['client_processes']}; after uploading, Join long-polls of "
            + (f"{r['long_poll_s']} s" if r["long_poll_s"] else "none")
            + (f"; uploads start over {r['stagger_s']:g} s" if r["stagger_s"] else "; uploads start at once"),
        ),
        ("floats per increment (float32 MiB)", f"{r['floats']:,} ({model_mib:.1f} MiB), {r['compression']}"),
        (
            "aggregator settings",
            f"max_concurrent_uploads {agg['max_concurrent_uploads']}, max_workers {agg['max_workers']}, "
            f"upload_wait_s {agg['upload_wait_s']}, stream window {agg['stream_window_bytes'] >> 10} KiB",
        ),
        ("PKI: CA + server + edge certificates", f"{r['pki_s']:.1f} s"),
        ("round time, first Join to round closed", f"{r['round_s']:.1f} s"),
        ("  joins + downloads (all edges ready)", f"{r['join_download_s']:.1f} s"),
        ("  upload phase (go to round closed)", f"{r['upload_phase_s']:.1f} s"),
        (
            "uploads counted / receipts saying CLOSED",
            f"{r['uploads_counted']}/{r['edges']} / {r['receipts_closed']}",
        ),
        (
            "ingest (protobuf message bytes / upload phase)",
            f"{r['ingest_mb_s']:.0f} MB/s ({r['upload_message_bytes'] / MB:,.0f} MB)",
        ),
        (
            "upload latency median / p95 / max",
            f"{fmt(lat['median'], '.1f')} / {fmt(lat['p95'], '.1f')} / {fmt(lat['max'], '.1f')} s",
        ),
        (
            "server per upload: queued max, receive+verify and sum+fsync median",
            f"{fmt(ph.get('queued_max_s'), '.1f')} s, {fmt(ph.get('receive_verify_median_s'), '.3f')} s, "
            f"{fmt(ph.get('sum_fsync_median_s'), '.3f')} s",
        ),
        (
            "aggregator RSS: idle / after joins / peak (VmHWM)",
            f"{rss['idle']:.0f} / {rss['after_joins_downloads']:.0f} / {rss['peak']:.0f} "
            f"({rss['vm_hwm']:.0f}) MiB; peak / model {rss['peak'] / model_mib:.1f}x",
        ),
        (
            "client failures by status code (by stage)",
            f"{json.dumps(r['failures'])} ({json.dumps(r['failures_by_stage'])})"
            if r["failures"]
            else "none",
        ),
        (
            "retries by status code (edges that retried)",
            f"{json.dumps(r['retries']) if r['retries'] else 'none'} ({r['edges_retried']})",
        ),
        (
            "CPU s in upload phase: aggregator / clients / softirq / other",
            f"{cpu['aggregator']:.1f} / {cpu['clients']:.1f} / {cpu['softirq']:.1f} / "
            f"{cpu['other_processes']:.1f}; "
            f"client share {r['client_cpu_share']:.2f}, machine {r['machine_utilisation']:.0%} busy",
        ),
        (
            "aggregator log: ERROR / WARNING lines",
            f"{len(r['aggregator_log']['ERROR'])} / {len(r['aggregator_log']['WARNING'])}"
            + "".join(
                f"\n    {line}"
                for line in (r["aggregator_log"]["ERROR"] + r["aggregator_log"]["WARNING"])[:3]
            ),
        ),
        (
            "final state == FedAvg of the uploads",
            f"{'yes' if r['state_check']['ok'] else 'NO'} (max abs error "
            f"{r['state_check'].get('max_abs_error', float('nan')):.1e})",
        ),
        (
            "code measured",
            f"{r['source'].get('commit', '?')}"
            + (
                f" + uncommitted {' '.join(r['source']['aggregator_uncommitted'])}"
                if r["source"].get("aggregator_uncommitted")
                else ""
            ),
        ),
        (
            "load average 1/5/15 min before -> after",
            " / ".join(f"{x:.2f}" for x in r["load_before"])
            + " -> "
            + " / ".join(f"{x:.2f}" for x in r["load_after"]),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
