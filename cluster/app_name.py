"""The name of herd's Serve application, in a module of its own: Serve's proxy process (cluster.proxy_streams)
and `herd status` need it without importing the application's deployments (and torch with them)."""
from __future__ import annotations

import os

APP_NAME = "herd"
# Where the application has another name (the chart's serve.applicationName), the pods say which.
APPLICATION_ENV = "HERD_SERVE_APPLICATION"


def served_application() -> str:
    """The application that takes a call to herd's gRPC services that names none (`application` metadata)."""
    return os.environ.get(APPLICATION_ENV) or APP_NAME


def model_application(app_name: str, model_name: str) -> str:
    """The Serve application of one model where each model is an application of its own beside the ingress's
    (`app_name`): the chart's serveConfigV2 (cluster.app.build_model_app). helm/herd/templates/_helpers.tpl
    ("herd.serveConfig") names them the same way."""
    return f"{app_name}-model-{model_name}"
