"""Read a TensorBoard log folder the way TensorBoard's HParams dashboard does, through its own
backend (no server): the experiment it infers and its session groups (one per trial)."""
from __future__ import annotations


def hparams_view(logdir: str, metric_tags: list[str] | None = None):
    """``(experiment, sessions)``: the HParams experiment (hparam_infos, metric_infos) and, per
    run, ``{"hparams": {name: python value}, "status": name, "metrics": {tag: value}}``."""
    from google.protobuf import json_format
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    tb = base_plugin.TBContext(logdir=logdir, multiplexer=multiplexer, data_provider=provider)
    backend = backend_context.Context(tb)
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, backend, "",
                                        api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=1000)
    request.allowed_statuses.extend([api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS,
                                     api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    for info in experiment.hparam_infos:
        request.col_params.add(hparam=info.name)
    for info in experiment.metric_infos:
        request.col_params.add(metric=info.name)
    groups = list_session_groups.Handler(request_context, backend, "", request).run()
    sessions = {}
    for group in groups.session_groups:
        for session in group.sessions:
            sessions[session.name] = {
                "hparams": {k: json_format.MessageToDict(v) for k, v in group.hparams.items()},
                "status": api_pb2.Status.Name(session.status),
                "metrics": {m.name.tag: m.value for m in session.metric_values},
            }
    return experiment, sessions
