"""The Prometheus families dilo exports, with their HELP text (dilo/metrics.py serves them).

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/): the
base unit last (`_seconds`, `_bytes`, `_ratio`), `_total` on counters (prometheus_client
appends it), one family per quantity with `worker` and `fragment` as labels rather than
gauges whose value is an id, and no pre-computed rates (`rate(dilo_tokens_total[1m])`).
A JSON-lines field that is not declared here (ids, hashes, strings) is not exported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """One Prometheus family fed by a numeric field of the JSON lines."""

    name: str  # without `_total`: prometheus_client adds it to counters
    type: str  # gauge (latest value), counter (sum of the values), summary (count and sum)
    help: str
    by_fragment: bool = False  # labelled with the record's `fragment` (Streaming DiLoCo)
    label: str = ""  # labelled with this field of the record (e.g. `set` of an eval.sets loss)


# (record kind, field) -> family. `step` and `outer_step` feed the step gauges from any kind.
FIELD_METRICS: dict[tuple[str, str], Spec] = {
    ("inner", "loss"): Spec("dilo_train_loss", "gauge",
                            "Training loss (nats per token) at the latest logged inner step."),
    ("inner", "lr"): Spec("dilo_inner_learning_rate", "gauge",
                          "Inner AdamW learning rate at the latest logged inner step."),
    ("inner", "tokens"): Spec("dilo_tokens", "counter",
                              "Tokens this process trained on; rate() gives tokens per second."),
    ("sync", "seconds"): Spec(
        "dilo_sync_duration_seconds", "summary",
        "Outer exchanges: their number (_count) and wall time (_sum), from the start of the "
        "exchange to the averaged pseudo-gradient in hand.", by_fragment=True),
    ("sync", "seconds_hidden"): Spec(
        "dilo_sync_hidden_seconds", "counter",
        "Exchange time that ran while the worker computed (overlapped outer steps).", True),
    ("sync", "seconds_exposed"): Spec(
        "dilo_sync_exposed_seconds", "counter", "Exchange time the worker waited for.", True),
    ("sync", "bytes_sent"): Spec(
        "dilo_sync_sent_bytes", "counter",
        "Bytes this process sent in outer exchanges, counted from the buffers on the wire.", True),
    ("sync", "bytes_received"): Spec(
        "dilo_sync_received_bytes", "counter",
        "Bytes this process received in outer exchanges, counted from the buffers on the wire.",
        True),
    ("sync", "outer_state_bytes"): Spec(
        "dilo_outer_state_bytes", "gauge",
        "Host bytes of this process's outer state (θ, outer momentum, error-feedback residual); "
        "divided by run.worker_size with run.shard = fsdp."),
    ("sync", "intra_bytes"): Spec(
        "dilo_sync_intra_worker_bytes", "counter",
        "Bytes moved between the ranks of one worker (run.worker_size > 1) in outer exchanges.",
        True),
    ("sync", "peers"): Spec("dilo_sync_peers", "gauge",
                            "Workers whose pseudo-gradients the latest exchange averaged."),
    ("sync", "codec_error"): Spec(
        "dilo_sync_codec_error_ratio", "gauge",
        "Relative error of the owner's encode of the averaged pseudo-gradient, latest exchange.",
        True),
    ("sync", "pseudo_grad_norm"): Spec(
        "dilo_sync_pseudo_grad_norm", "gauge",
        "L2 norm of this worker's pseudo-gradient in the latest exchange.", True),
    ("sync", "round_tokens"): Spec(
        "dilo_round_tokens", "gauge",
        "Tokens this worker trained on in the latest round (its report; docs/uneven.md)."),
    ("sync", "round_steps"): Spec("dilo_round_inner_steps", "gauge",
                                  "Inner steps this worker took in the latest round."),
    ("sync", "weight"): Spec(
        "dilo_round_weight_ratio", "gauge",
        "This worker's share of the latest averaged pseudo-gradient (its tokens / the group's with "
        "outer.weighting = tokens, else 1 / members)."),
    ("sync", "idle_seconds"): Spec(
        "dilo_sync_idle_seconds", "counter",
        "Seconds this worker waited at exchanges for the last member to reach them (from the "
        "members' round reports)."),
    ("eval", "eval_loss"): Spec("dilo_eval_loss", "gauge",
                                "Loss (nats per token) on the held-out split, latest evaluation."),
    ("eval", "set_loss"): Spec("dilo_eval_set_loss", "gauge",
                               "Loss (nats per token) on a named held-out set (eval.sets; label "
                               "`set`), latest evaluation.", label="set"),
    ("event", "workers"): Spec("dilo_workers", "gauge",
                            "DiLoCo workers in the run (at start or at the latest resume)."),
    ("event", "synced_params"): Spec("dilo_synced_parameters", "gauge",
                                     "Parameters each outer step exchanges (the size of θ)."),
}
STEP_METRICS = {
    "step": Spec("dilo_inner_step", "gauge", "Inner steps this worker has done."),
    "outer_step": Spec("dilo_outer_step", "gauge", "Outer steps this worker has applied."),
}
# event name -> (info family, the event's fields that become its labels)
EVENT_INFO = {
    "start": ("dilo_run", "The run as this worker started it.", ("mode", "fingerprint", "worker_size")),
    "swarm": ("dilo_swarm_peer", "This process's swarm peer (comm.backend = hivemind).",
              ("peer", "shard", "num_shards")),
}
EVENTS = Spec("dilo_events", "counter",
                "Events in metrics-<worker>.jsonl, by name (start, resume, checkpoint, stop, ...).")
# Help of the counters that `Metrics.count(name)` increments (family dilo_<name>_total).
COUNTER_HELP = {
    "dropped_contributions": "Pseudo-gradient contributions this worker dropped as a chunk's owner "
                            "(non-finite or no-contribution marker, saturated at the codec's limit, "
                            "norm above its report, wrong size), by contributor (member index or "
                            "swarm peer).",
    "clipped_contributions": "Contributions scaled down by outer.aggregate = clip, by contributor.",
    "skipped_outer_steps": "Outer steps skipped because no valid contribution arrived for part of "
                           "the pseudo-gradient (θ and momentum unchanged).",
    "reset_residuals": "Error-feedback residuals reset to zero (non-finite, or their Δ + e withheld).",
    "withheld_contributions": "This worker's pseudo-gradients sent as no contribution (non-finite or "
                              "out of the codec's range).",
    "checkpoint_waits": "Background checkpoints that had to wait for the previous write.",
    "refused_peers": "Swarm peers refused, by reason (no run key, other run settings, dropped_contributions: "
                     "refused from rounds for a while after repeated drops).",
    "state_downloads": "Global states this peer downloaded from others, by reason.",
    "solo_rounds": "Swarm rounds this peer ran alone (applied its own pseudo-gradient).",
    "partial_rounds": "Swarm rounds abandoned because a member failed mid-exchange (retried).",
    "rejected_results": "Fetched round results refused (wrong size or checksum).",
    "round_results_fetched": "Results of rounds in flight fetched from other peers.",
    "rejected_contributions": "Contributions refused by their chunk's owner, by reason.",
}


def counter_help(name: str) -> str:
    return COUNTER_HELP.get(name, f"Count of {name.replace('_', ' ')} (Metrics.count).")
