"""`GET /metrics`: the server's counters as Prometheus text."""

from __future__ import annotations

from mlops.serving.context import Ctx


def prometheus(ctx: Ctx) -> str:
    pool = ctx.pool
    st = pool.state()
    engines = pool.engines()
    lines = [ctx.stats.prometheus(pool.queue_depth(), sorted(engines)).rstrip("\n")]
    lines += [
        "# HELP mlops_state_version Version of the routing state being served.",
        "# TYPE mlops_state_version gauge",
        f"mlops_state_version {st.version}",
        "# HELP mlops_routing_weight Share of traffic (percent) routed to a release.",
        "# TYPE mlops_routing_weight gauge",
        *[f'mlops_routing_weight{{release="{r}"}} {w}' for r, w in sorted(st.routing.items())],
        "# HELP mlops_release_busy Requests queued or running, by release.",
        "# TYPE mlops_release_busy gauge",
        *[f'mlops_release_busy{{release="{r}"}} {e.busy}' for r, e in sorted(engines.items())],
        "# HELP mlops_engine_decode_steps_total Decode steps; rows/steps is the mean batch size.",
        "# TYPE mlops_engine_decode_steps_total counter",
        *[f'mlops_engine_decode_steps_total{{release="{r}"}} {e.steps}' for r, e in sorted(engines.items())],
        "# TYPE mlops_engine_decode_rows_total counter",
        *[f'mlops_engine_decode_rows_total{{release="{r}"}} {e.step_rows}' for r, e in sorted(engines.items())],
        "# HELP mlops_engine_prefills_total Prefill passes (each admits the requests that arrived).",
        "# TYPE mlops_engine_prefills_total counter",
        *[f'mlops_engine_prefills_total{{release="{r}"}} {e.prefills}' for r, e in sorted(engines.items())],
        "# HELP mlops_model_loads_total Model loads: preload (watcher) or request (on the request path).",
        "# TYPE mlops_model_loads_total counter",
        *[f'mlops_model_loads_total{{source="{s}"}} {pool.loads[s]}' for s in ("preload", "request")],
        "# HELP mlops_rerouted_total Requests routed again because their release was draining.",
        "# TYPE mlops_rerouted_total counter",
        f"mlops_rerouted_total {ctx.rerouted}",
        "# HELP mlops_shadow_requests_total Mirrored requests, by shadow release and outcome.",
        "# TYPE mlops_shadow_requests_total counter",
    ]
    for rel, (total, agreed, errors) in sorted(ctx.shadow.totals().items()):
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="agree"}} {agreed}')
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="differ"}} {total - agreed - errors}')
        lines.append(f'mlops_shadow_requests_total{{release="{rel}",outcome="error"}} {errors}')
    return "\n".join(lines) + "\n"
