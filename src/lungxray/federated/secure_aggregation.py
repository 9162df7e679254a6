"""Secure aggregation of the sites' heads: Flower's SecAgg+ (Bell et al., CCS 2020), with which the
server learns the sum of the sites' weighted heads and never one site's head.

Flower 1.42 implements SecAgg+ for its legacy workflow API only: on the server `SecAggPlusWorkflow`,
which runs a round of a legacy strategy over a `LegacyContext`; at a site `secaggplus_mod`, around a
ClientApp that replies with a legacy `FitRes`. This module fits the federation's Message-API apps to
them, without touching the protocol:

    server  `secure_round`: one round of training through `SecAggPlusWorkflow` and a legacy FedAvg
            over the checked sites (setup, key sharing, masked heads, unmasking: four messages)
    site    `secure_aggregation_mod`: a SecAgg+ message goes through `secaggplus_mod`, the training
            it asks for through the site's own `train`, its reply masked before it leaves

Every site holds a share of every other site's keys (`num_shares` 1.0: all sites), and any half of
them can unmask a site that drops out after sending its masked head. Before masking, a site's head
times its weight (its training films / the largest site's) is clipped to +-`CLIPPING_RANGE` and
quantised to `QUANTIZATION_RANGE` levels; `quantisation_bound` is how far the average can then be
from plain FedAvg's (tests/test_federated.py measures it).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

CLIPPING_RANGE = 8.0  # Flower's default; a head's weights are far inside it (docs/federated.md)
QUANTIZATION_RANGE = 2 ** 22  # Flower's default levels over [-CLIPPING_RANGE, CLIPPING_RANGE]
RECONSTRUCTION_THRESHOLD = 0.5  # the share of the sites that can unmask a site that dropped out


def quantisation_bound(weights: list[int]) -> float:
    """The largest difference, per weight, between SecAgg+'s average of the sites' heads and plain
    FedAvg's, for sites with `weights` training films. Each site's head times its weight (its films
    over the largest site's) is rounded stochastically to a step of 2 x CLIPPING_RANGE /
    QUANTIZATION_RANGE (less than a step each), its weight to the nearest 1 / QUANTIZATION_RANGE (at
    most half a step's worth over the clipping range), and the sum is divided by the total weight."""
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    return 1.5 * len(weights) * step * max(weights) / sum(weights)


# --- The site -------------------------------------------------------------------------------------

def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: SecAgg+'s messages through Flower's `secaggplus_mod`, with the training it
    asks for done by the app's own `train` handler; every other message straight to the app."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    return secaggplus_mod(message, context, lambda legacy, ctxt: _as_legacy_training(legacy, ctxt, call_next))


def _as_legacy_training(message: Message, context: Context, call_next) -> Message:
    """The app's `train` on a legacy FitIns, its reply as the legacy FitRes that `secaggplus_mod` masks."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    instructions = compat.recorddict_to_fitins(message.content, keep_input=True)
    message.content = RecordDict({"arrays": ArrayRecord(parameters_to_ndarrays(instructions.parameters)),
                                  "config": ConfigRecord(instructions.config)})
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    metrics = dict(reply.content["metrics"])
    count = int(metrics.pop("num-examples"))
    reply.content = compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(reply.content["arrays"].to_numpy_ndarrays()), count,
               metrics), keep_input=True)
    return reply


# --- The server -----------------------------------------------------------------------------------

def secure_round(grid, sites: dict[int, int], server_round: int, arrays: ArrayRecord, config: dict,
                 timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One round of training of `sites` (node id: training films) from `arrays`, the heads averaged
    by SecAgg+ weighted by films: (the average, the sites' mean training loss and accuracy), or
    (None, None) if the protocol halted (too few sites answered a stage)."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    manager = SimpleClientManager()
    for node in sites:
        manager.register(GridClientProxy(node, grid, grid.run.run_id))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(sites),
                      min_available_clients=len(sites), on_fit_config_fn=lambda r: {**config, "server-round": r},
                      fit_metrics_aggregation_fn=_weighted_mean)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), ServerConfig(num_rounds=server_round), strategy, manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    start = context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(arrays.to_numpy_ndarrays())
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                       max_weight=float(max(sites.values())), clipping_range=CLIPPING_RANGE,
                       quantization_range=QUANTIZATION_RANGE, timeout=timeout)(grid, context)
    averaged = context.state.array_records[MAIN_PARAMS_RECORD]
    if averaged is start:
        return None, None
    trained = {key: values[-1][1] for key, values in context.history.metrics_distributed_fit.items()}
    return ArrayRecord(averaged.to_numpy_ndarrays()), MetricRecord(trained)


def _weighted_mean(results: list[tuple[int, dict]]) -> dict:
    """The sites' training loss and accuracy, weighted by their films (as the Message API's FedAvg does)."""
    total = sum(count for count, _ in results)
    return {key: float(sum(count * metrics[key] for count, metrics in results) / total)
            for key in ("loss", "accuracy") if all(key in metrics for _, metrics in results)}
