"""Push the dashboards to a running Grafana: folder and datasources created if missing,
dashboards upserted, and nothing written that is already as it should be.

Uses ``grafana-client`` (the maintained fork of ``grafana-api``). Every object is read first and
compared with what we would write, so a second push sends no writes at all: no new dashboard
versions in Grafana's history, no datasource reloads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dashboards.datasources import (
    FOLDER_TITLE,
    FOLDER_UID,
    postgres_datasource,
    prometheus_datasource,
)

PUSH_MESSAGE = "anomaly dashboards push"


class PushError(Exception):
    pass


@dataclass
class PushResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)

    def summary(self) -> str:
        parts = [
            f"{name}: {', '.join(getattr(self, name))}"
            for name in ("created", "updated", "unchanged")
            if getattr(self, name)
        ]
        return "; ".join(parts) or "nothing to do"


def _existing(get: Callable[[str], Any], uid: str) -> Any:
    """``get(uid)``, or None where Grafana answers 404."""
    try:
        return get(uid)
    except Exception as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        return None


def _subset_equal(ours: Any, theirs: Any) -> bool:
    """Whether every key we set has our value on the server (the server may add its own keys)."""
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and all(
            _subset_equal(v, theirs.get(k, _MISSING)) for k, v in ours.items()
        )
    return ours == theirs


_MISSING = object()


def push(
    url: str,
    token: str | None = None,
    *,
    dashboards: Iterable[dict[str, Any]] | None = None,
    datasources: Iterable[dict[str, Any]] | None = None,
    folder_uid: str = FOLDER_UID,
    folder_title: str = FOLDER_TITLE,
    timeout: float = 10.0,
) -> PushResult:
    """Create or update the folder, the datasources and the dashboards at ``url``.

    ``token``: a service-account token (sent as ``Authorization: Bearer``); without one,
    credentials in the URL (``http://user:pass@host:3000``) are used for basic auth.
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    if dashboards is None:
        from dashboards.definitions import all_dashboards

        dashboards = [d.to_json() for d in all_dashboards()]
    if datasources is None:
        datasources = [postgres_datasource(), prometheus_datasource()]

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    result = PushResult()
    try:
        _push_folder(api, folder_uid, folder_title, result)
        for ds in datasources:
            _push_datasource(api, ds, result)
        for dashboard in dashboards:
            _push_dashboard(api, dashboard, folder_uid, result)
    except GrafanaException as exc:
        raise PushError(f"Grafana at {url} answered {exc.status_code}: {exc.message}") from exc
    except OSError as exc:  # pragma: no cover - network failures vary by platform
        raise PushError(f"cannot reach Grafana at {url}: {exc}") from exc
    return result


def _push_folder(api: Any, uid: str, title: str, result: PushResult) -> None:
    label = f"folder {uid}"
    folder = _existing(api.folder.get_folder, uid)
    if folder is None:
        api.folder.create_folder(title, uid=uid)
        result.created.append(label)
    elif folder.get("title") != title:
        api.folder.update_folder(uid, title=title, overwrite=True)
        result.updated.append(label)
    else:
        result.unchanged.append(label)


def _push_datasource(api: Any, ds: dict[str, Any], result: PushResult) -> None:
    uid = ds["uid"]
    label = f"datasource {uid}"
    existing = _existing(api.datasource.get_datasource_by_uid, uid)
    if existing is None:
        api.datasource.create_datasource(ds)
        result.created.append(label)
        return
    # Secrets cannot be read back: a password is (re)sent only if Grafana has none stored.
    plain = {k: v for k, v in ds.items() if k != "secureJsonData"}
    secrets = ds.get("secureJsonData") or {}
    stored_secrets = existing.get("secureJsonFields") or {}
    missing_secret = any(not stored_secrets.get(k) for k in secrets)
    if _subset_equal(plain, existing) and not missing_secret:
        result.unchanged.append(label)
        return
    body = dict(ds)
    if not missing_secret:
        body.pop("secureJsonData", None)  # Grafana keeps the stored secret
    api.datasource.update_datasource_by_uid(uid, body)
    result.updated.append(label)


def _push_dashboard(
    api: Any, dashboard: dict[str, Any], folder_uid: str, result: PushResult
) -> None:
    uid = dashboard["uid"]
    label = f"dashboard {uid}"
    existing = _existing(api.dashboard.get_dashboard, uid)
    if existing is not None:
        stored = existing.get("dashboard") or {}
        same_folder = (existing.get("meta") or {}).get("folderUid") == folder_uid
        ours = {k: v for k, v in dashboard.items() if k not in ("id", "version")}
        if same_folder and _subset_equal(ours, stored):
            result.unchanged.append(label)
            return
    body = {k: v for k, v in dashboard.items() if k != "id"}
    body["id"] = None  # match by uid
    api.dashboard.update_dashboard(
        {"dashboard": body, "folderUid": folder_uid, "overwrite": True, "message": PUSH_MESSAGE}
    )
    (result.updated if existing is not None else result.created).append(label)
